"""What-ifs: every link of one kind, one more Mac, and `harness whatif` comparing link kinds (issue 13 item 3)."""
import pytest

from harness import catalog
from harness.cli import main
from harness.costmodel import PlanOptions, load_profile
from harness.experiment import check_experiment
from harness.planning import plan_with
from harness.specs import UserError
from harness.whatif import add_nodes, apply, parse_node_spec, usual_kind, with_link
from harness.commands.whatif import recost

MIXED = catalog.load_cluster("mixed")
M2MAX_PAIRS = {"studio-m3u-mbp-m2max", "studio-m4max-mbp-m2max", "mbp-m2max-mini-m4pro"}


def kinds(cluster):
    return {f"{l.a}-{l.b}": l.kind for l in cluster.links}


def test_every_link_becomes_the_kind_where_both_ends_can_carry_it():
    cluster, notes = with_link(MIXED, "tb5-rdma")
    assert kinds(cluster) == {**{p: "tb5-rdma" for p in kinds(MIXED)}, **{p: "tb4-tcp" for p in M2MAX_PAIRS}}
    assert cluster.name == "mixed@tb5-rdma" and len(notes) == 1 and "studio-m3u-mbp-m2max" in notes[0]
    ethernet, notes = with_link(MIXED, "10gbe")
    assert set(kinds(ethernet).values()) == {"10gbe"} and notes == []
    link = ethernet.link("studio-m3u", "studio-m4max")
    assert (link.latency_us, link.bandwidth_gbps) == (catalog.link_kinds()["10gbe"]["latency_us"],
                                                      catalog.link_kinds()["10gbe"]["bandwidth_gbps"])


def test_an_added_mac_is_cabled_like_most_pairs_and_named_after_its_chip():
    assert usual_kind(MIXED) == "tb5-rdma"      # 3 RDMA pairs, 3 default TB4 pairs: a tie goes to the faster
    assert usual_kind(with_link(MIXED, "10gbe")[0]) == "10gbe"
    bigger = add_nodes(MIXED, ["M4 Max:128", "M2 Max/38:96"])
    names = [n.name for n in bigger.nodes]
    assert names[-2:] == ["added1-m4max", "added2-m2max"] and len(bigger.links) == 15
    assert bigger.link("studio-m3u", "added1-m4max").kind == "tb5-rdma"
    assert bigger.link("added1-m4max", "added2-m2max").kind == "tb4-tcp"     # the M2 Max has no Thunderbolt 5
    node = bigger.node("added1-m4max")
    assert (node.chip.name, node.chip.gpu_cores, node.memory_gb, node.usable_fraction) == ("M4 Max", 40, 128, 0.75)


@pytest.mark.parametrize("spec, message", [
    ("M4 Max", "is not CHIP[/GPU_CORES]:MEMORY_GB"),
    ("M9:64", "unknown chip 'M9'"),
    ("M4 Max:1024", "takes at most 128 GB"),
    ("M4 Max/7:64", "has no 7-core GPU bin"),
    ("M4 Max:0", "more than 0 GB"),
])
def test_bad_node_specs_say_what_is_wrong(spec, message):
    with pytest.raises(UserError, match="--add-node") as err:
        parse_node_spec(spec)
    assert message in str(err.value)


def test_a_link_kind_not_in_the_catalog_is_refused():
    with pytest.raises(UserError, match="unknown link kind 'usb2'; known kinds: tb5-rdma"):
        apply(MIXED, "usb2")


def test_recosting_a_plan_over_its_own_cabling_gives_its_own_figures():
    model = catalog.load_model("llama-3.1-70b", 4)
    options = PlanOptions(profile=load_profile(None))
    own = plan_with("hybrid_optimal", MIXED, model, options)
    assert recost(own, MIXED, model, options).predicted == own.predicted
    wifi, _ = with_link(MIXED, "wifi")
    assert recost(own, wifi, model, options).predicted["tpot_ms"] > 10 * own.predicted["tpot_ms"]


def test_plan_takes_link_and_add_node_flags(capsys):
    assert main(["plan", "--link", "wifi", "--strategy", "hybrid_optimal"]) == 0
    out = capsys.readouterr().out
    assert "cluster mixed@wifi" in out and "x2 TP" not in out    # no tensor parallelism over Wi-Fi
    assert main(["plan", "--add-node", "M4 Max:128", "--link", "tb5-rdma"]) == 0
    captured = capsys.readouterr()
    assert "added1-m4max (M4 Max 40c, 128 GB)" in captured.out and "use tb4-tcp" in captured.err


def test_whatif_prints_one_row_per_link_kind(capsys):
    assert main(["whatif", "--links", "tb5-rdma,10gbe,wifi"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [l for l in lines if l.split(" ")[0] in ("as", "tb5-rdma", "10gbe", "wifi")]
    assert [r.split()[0] for r in rows] == ["as", "tb5-rdma", "10gbe", "wifi"]
    assert "(tp2)" in rows[1] and "(tp2)" not in rows[3]
    assert main(["whatif", "--links", "tb5-rdma,usb2"]) == 2


def test_experiment_files_accept_link_and_add_nodes_and_check_them():
    check_experiment({"link": "10gbe", "add_nodes": ["M4 Pro:64"]}, "exp.toml")
    with pytest.raises(UserError, match="exp.toml: link: found 'fast'"):
        check_experiment({"link": "fast"}, "exp.toml")
    with pytest.raises(UserError, match=r"exp.toml: add_nodes\[0\]"):
        check_experiment({"add_nodes": ["M4 Pro"]}, "exp.toml")
