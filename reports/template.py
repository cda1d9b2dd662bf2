"""The report page, a jinja2 template kept in Python so it ships with the package without package-data rules.

Self-contained on purpose: inline CSS, images as data: URIs, no scripts, no web fonts, no links to fetch.
"""
PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 0; color: #1d2733;
         background: #f6f7f9; line-height: 1.45; }
  main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
  h1 { font-size: 1.6em; margin: 0 0 4px; }
  h2 { font-size: 1.25em; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e3e7ec; }
  h3 { font-size: 1.05em; margin: 22px 0 8px; }
  .meta { color: #5b6673; font-size: 0.92em; }
  table { border-collapse: collapse; margin: 6px 0 14px; font-size: 0.92em; }
  th, td { border: 1px solid #dde2e8; padding: 5px 10px; text-align: right; vertical-align: top; }
  th { background: #f0f3f6; text-align: center; }
  td:first-child, th:first-child { text-align: left; }
  td.text { text-align: left; }
  td.status-cell { text-align: center; }
  .scroll { overflow-x: auto; }
  tr.fail td { background: #fdecec; }
  .status { font-weight: 700; padding: 1px 8px; border-radius: 10px; white-space: nowrap; }
  .status.pass { background: #dff3e4; color: #17692c; }
  .status.fail { background: #f9d6d5; color: #a4161a; }
  .status.nodata { background: #eceff3; color: #5b6673; }
  .status.na { background: #eef0fb; color: #3d4a8a; }
  .badge { display: inline-block; font-size: 0.75em; font-weight: 600; padding: 1px 8px; border-radius: 10px;
           vertical-align: middle; margin-left: 6px; text-transform: uppercase; letter-spacing: 0.03em; }
  .badge.measured { background: #d9ecff; color: #0b4f8a; }
  .badge.simulated { background: #efe3fb; color: #5a2d82; }
  .badge.theoretical { background: #fff1d6; color: #8a5a00; }
  .badge.unknown, .badge.mixed { background: #eceff3; color: #5b6673; }
  .banner { border: 3px solid #c1121f; background: #fdecec; color: #7a0c14; padding: 14px 18px; margin: 14px 0;
            font-size: 1.1em; border-radius: 6px; }
  .banner strong { font-size: 1.15em; }
  .note { background: #f6f8fa; border-left: 4px solid #c7d0da; padding: 8px 12px; color: #45505c; font-size: 0.92em; }
  figure { margin: 10px 0 26px; }
  figure img { max-width: 100%; border: 1px solid #e3e7ec; }
  figcaption { color: #45505c; font-size: 0.9em; margin-top: 4px; }
  .verdict { font-size: 1.05em; margin: 6px 0 12px; }
  details { margin: 10px 0; }
  summary { cursor: pointer; font-weight: 600; }
  details.run { border: 1px solid #dde2e8; border-radius: 6px; padding: 8px 14px; margin: 8px 0; }
  details.run > summary { font-size: 1.05em; }
  details.run[open] > summary { border-bottom: 1px solid #e3e7ec; padding-bottom: 6px; }
  code { background: #f0f3f6; padding: 0 4px; border-radius: 3px; }
  .stack { display: flex; height: 22px; background: #f6f7f9; border: 1px solid #dde2e8; margin: 2px 0 8px; }
  .stack span { display: block; height: 100%; }
  .stack-label { font-size: 0.88em; color: #45505c; }
</style>
</head>
<body>
<main>
<h1>{{ title }}</h1>
<p class="meta">Rendered {{ rendered }} from saved run folders {% for run in runs %}<code>{{ run.path }}</code>{% if not loop.last %}, {% endif %}{% endfor %}.
Every figure and number says where it comes from:
<span class="badge measured">measured</span> on real hardware,
<span class="badge simulated">simulated</span> by the cluster model, or
<span class="badge theoretical">theoretical</span> (the partition plan's predictions).</p>

{% for run in runs if run.incomplete %}
<div class="banner" id="incomplete-{{ loop.index }}"><strong>INCOMPLETE RUN: {{ run.name }}</strong><br>
{{ run.incomplete_reason }}. Its numbers cover only what finished before it stopped; do not compare them with complete runs.</div>
{% endfor %}

{% macro badge(source) -%}
{% for part in source.split(' + ') %}<span class="badge {{ part }}">{{ part }}</span>{% endfor %}
{%- endmacro %}

{% macro table(t) -%}
<div class="scroll"><table>
<thead><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in t.rows %}<tr>{% for cell in row %}<td{% if loop.index <= t.text_columns %} class="text"{% endif %}>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody>
</table></div>
{%- endmacro %}

{% macro figure(p) -%}
<figure>
<h3>{{ p.title }} {{ badge(p.source) }}</h3>
<img alt="{{ p.title }} ({{ p.source }})" src="data:image/png;base64,{{ p.png_base64 }}">
{% if p.caption %}<figcaption>{{ p.caption }}</figcaption>{% endif %}
</figure>
{%- endmacro %}

{% macro targets_table(view) -%}
<p class="verdict">{{ view.verdict }}</p>
<table class="targets">
<thead><tr><th>target</th><th>metric</th><th>threshold</th><th>value</th><th>source</th><th>theoretical (plan)</th><th>status</th><th>conditions / note</th></tr></thead>
<tbody>
{% for r in view.rows %}
<tr class="{{ r.status_class }}"><td class="text">{{ r.name }}</td><td class="text">{{ r.metric }}</td>
<td>{{ r.threshold }}</td><td>{{ r.value }}</td><td class="text">{{ badge(r.source) if r.source else '–' }}</td>
<td>{{ r.theoretical }}</td>
<td class="status-cell"><span class="status {{ r.status_class }}">{{ r.status }}</span></td><td class="text">{{ r.notes }}</td></tr>
{% endfor %}
</tbody>
</table>
{%- endmacro %}

{% if comparison %}
<h2 id="comparison">Comparison of {{ runs | length }} runs</h2>
<p class="meta">Runs: {% for run in runs %}<a href="#fold-{{ loop.index }}">{{ loop.index }} {{ run.strategy }}</a>{% if not loop.last %} · {% endif %}{% endfor %} (each folded below).</p>
{{ table(comparison.table) }}
{% if comparison.targets %}<h3>Targets across runs</h3>{{ table(comparison.targets) }}{% endif %}
{% for p in comparison.plots %}{{ figure(p) }}{% endfor %}
{% endif %}

{% set folded = runs | length > 1 %}
{% if folded %}<h2 id="runs">Each run's own report</h2>
<p class="meta">Folded so the comparison stays one screen long: open a run to read its targets, tables and figures.</p>{% endif %}
{% for run in runs %}
{% if folded %}<details class="run" id="fold-{{ loop.index }}"><summary>Run {{ loop.index }}: {{ run.strategy }} · {{ run.name }} {{ badge(run.source) }}{% if run.incomplete %} <span class="status fail">incomplete</span>{% endif %}
<span class="meta">· {{ run.targets.verdict }}</span></summary>{% endif %}
<section id="run-{{ loop.index }}">
<h2>{% if runs | length > 1 %}Run {{ loop.index }}: {% endif %}{{ run.name }} {{ badge(run.source) }}</h2>
<p class="meta">strategy <strong>{{ run.strategy }}</strong>{% if run.model %} · model <strong>{{ run.model }}</strong>{% endif %}
{% if run.backend %} · backend {{ run.backend }}{% endif %}{% if run.created %} · {{ run.created }}{% endif %}
{% if run.commit %} · commit <code>{{ run.commit }}</code>{% endif %}</p>
{% if run.missing %}<p class="note">Files missing from this run folder: {{ run.missing | join(', ') }}.</p>{% endif %}

<h3 id="targets-{{ loop.index }}">Targets</h3>
{% if run.targets.rows %}{{ targets_table(run.targets) }}{% else %}<p class="note">This run sets no targets.</p>{% endif %}

<h3>Latency (ms) {{ badge(run.source) }}</h3>
{% if run.latency %}{{ table(run.latency) }}{% else %}<p class="note">summary.json has no latency metrics.</p>{% endif %}
<h3>Run figures {{ badge(run.source) }}</h3>
{{ table(run.headline) }}

{% for p in run.plots %}{{ figure(p) }}{% endfor %}
{% for msg in run.plot_notes %}<p class="note">{{ msg }}</p>{% endfor %}

{% if run.plan_table %}<h3>Partition plan {{ badge('theoretical') }}</h3>{{ table(run.plan_table) }}{% endif %}
{% if run.predicted %}<h3>Plan predictions {{ badge('theoretical') }}</h3>{{ table(run.predicted) }}{% endif %}
{% if run.warnings %}<p class="note">Plan warnings: {{ run.warnings | join('; ') }}</p>{% endif %}
{% if run.plan_notes %}<p class="note">Plan notes: {{ run.plan_notes | join('; ') }}</p>{% endif %}
{% if run.tpot %}<h3 id="tpot-breakdown-{{ loop.index }}">Why TPOT differs from the plan {{ badge(run.tpot.source) }} {{ badge('theoretical') }}</h3>
{% if run.tpot.table %}<p class="meta">The plan predicts one stream; the run serves many. Its mean TPOT, split into parts that add up to it (from steps.parquet; see reports/breakdown.py for the attribution).</p>
{{ table(run.tpot.table) }}
{% for bar in run.tpot.bars %}<div class="stack-label">{{ bar.label }} {{ badge(bar.source) }}</div>
<div class="stack" role="img" aria-label="{{ bar.label }}">{% for s in bar.segments %}<span style="width: {{ '%.3f' % s.width_pct }}%; background: {{ s.colour }}" title="{{ s.label }}: {{ '%.1f' % s.ms }} ms"></span>{% endfor %}</div>
{% endfor %}<p class="stack-label">{% for s in run.tpot.bars[-1].segments %}<span style="color: {{ s.colour }}">&#9632;</span> {{ s.label }}{% if not loop.last %} · {% endif %}{% endfor %}</p>{% endif %}
{% for msg in run.tpot.notes %}<p class="note">{{ msg }}</p>{% endfor %}
{% endif %}
{% if run.backend_stats %}<details><summary>Backend statistics ({{ run.source }})</summary>{{ table(run.backend_stats) }}</details>{% endif %}

<details><summary>Environment</summary>{{ table(run.environment) }}</details>
</section>
{% if folded %}</details>{% endif %}
{% endfor %}
</main>
</body>
</html>
"""
