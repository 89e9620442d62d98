"""The report as one self-contained HTML page: plots embedded as base64 PNGs, no script, no
request of any kind (its Content-Security-Policy forbids them). Everything a run provides
(names, reasons, a model's answers) is escaped by the template engine: a reason that holds
markup shows as text."""

from __future__ import annotations

import base64
import datetime as dt
import math

import jinja2
from markupsafe import Markup

from manager_daemon.report.baseline import Baseline, ratio, ratio_text
from manager_daemon.report.data import RunData
from manager_daemon.report.decisions import STATUSES, VERDICTS, Row, Summary
from manager_daemon.report.plots import COLOURS, Plot

_BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       margin: 24px auto; max-width: 1280px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #666; margin: 0 0 12px; } code { font-size: 12px; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 5px 7px; text-align: left;
         vertical-align: top; }
th { background: #f5f5f7; font-weight: 600; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0 4px; }
.card { border: 1px solid #e3e3e3; border-radius: 8px; padding: 8px 12px; min-width: 150px; }
.card b { display: block; font-size: 18px; } .card span { color: #666; font-size: 12px; }
figure { margin: 10px 0 18px; } figure img { max-width: 100%; height: auto; }
figcaption { color: #666; font-size: 12px; }
ul.v { list-style: none; margin: 0; padding: 0; } ul.v li { margin: 0 0 2px; }
.verdict { border-radius: 4px; padding: 0 5px; font-size: 12px; font-weight: 600; }
.accepted { background: #e3f4e4; color: #1b5e20; } .clamped { background: #fff4d6; color: #7a5200; }
.rejected { background: #fde4e4; color: #b71c1c; } .noop { background: #eee; color: #555; }
.status { font-weight: 600; } .st-advisory { color: #777; font-style: italic; }
.st-rejected, .st-error, .st-stale { color: #b71c1c; }
.source { display: inline-block; width: 9px; height: 9px; border-radius: 50%;
          margin-right: 4px; }
.why { color: #555; font-size: 12px; } .error { color: #b71c1c; font-size: 12px; }
tr.row-advisory td { background: #fafafa; }
.legend { font-size: 12px; color: #555; }
.health { border-left: 4px solid #b71c1c; background: #fdecea; color: #7f1d1d;
          padding: 8px 12px; margin: 8px 0; font-size: 15px; }
.compare { width: auto; min-width: 50%; margin: 10px 0 16px; }
</style>
</head>
<body>
{% block body %}{% endblock %}
<p class="meta">Made by <code>atm report</code> on {{ made_at }}.</p>
</body>
</html>
"""

_RUN = """{% extends "base" %}{% block body %}
<h1>What the manager did to {{ data.name }}</h1>
<p class="meta">run <code>{{ data.run.run_id }}</code> · {{ data.run.status | lower }} ·
objective <code>{{ data.objective }}</code>{% if not data.managed %} · not managed{% endif %}
{% if data.spec %} · {{ data.spec.framework }}, knobs {{ data.knob_names | join(", ") }}{% endif %}
</p>
{% if data.spec_error %}<p class="error">{{ data.spec_error }}</p>{% endif %}

<h2>Summary</h2>
{% include "notes" %}
<div class="cards">
  <div class="card" id="best"><span>best {{ data.objective.metric }}</span>
    <b>{{ point(summary.best) }}</b></div>
  <div class="card" id="final"><span>final {{ data.objective.metric }}</span>
    <b>{{ point(summary.final) }}</b>{% if summary.restored_at is not none %}
    <span>the best state, restored at step {{ summary.restored_at }}; last evaluation
      {{ point(summary.last) }}</span>{% endif %}</div>
  <div class="card" id="decisions-count"><span>decisions</span><b>{{ summary.decisions }}</b></div>
  <div class="card" id="issued"><span>interventions issued</span><b>{{ summary.issued }}</b>
    <span>{{ summary.rollbacks }} rollback(s), {{ summary.stops }} stop(s)</span></div>
  <div class="card" id="budget"><span>automatic interventions used</span>
    <b>{{ summary.automatic_issued }}{% if summary.budget is not none %} of
      {{ summary.budget }}{% endif %}</b></div>
  <div class="card" id="llm"><span>model calls</span><b>{{ summary.llm_calls }}</b>
    <span>{{ "%.1f" | format(summary.llm_seconds) }} s,
      {{ summary.prompt_tokens }} + {{ summary.completion_tokens }} tokens</span></div>
</div>
{% if baseline %}
<table id="baseline" class="compare">
  <thead><tr><th>{{ data.objective.metric }}</th><th class="num">best</th>
    <th class="num">final</th></tr></thead>
  <tbody>
  <tr data-run="{{ data.run.run_id }}" data-role="run"><td>{{ data.name }} (this run)</td>
    <td class="num">{{ point(summary.best) }}</td>
    <td class="num">{{ point(summary.final) }}</td></tr>
  <tr data-run="{{ baseline.data.run.run_id }}" data-role="baseline">
    <td>baseline: {{ baseline.data.name }} <code class="why">{{ baseline.data.run.run_id }}</code>
      <div class="why">{{ baseline.chosen }}</div></td>
    <td class="num">{{ point(baseline.summary.best) }}</td>
    <td class="num">{{ point(baseline.summary.final) }}</td></tr>
  <tr data-role="ratio"><td>this run ÷ baseline</td>
    <td class="num" data-ratio="{{ num(ratio(summary.best, baseline.summary.best)) }}">
      {{ times(ratio(summary.best, baseline.summary.best)) }}</td>
    <td class="num" data-ratio="{{ num(ratio(summary.final, baseline.summary.final)) }}">
      {{ times(ratio(summary.final, baseline.summary.final)) }}</td></tr>
  </tbody>
</table>
{% endif %}
{% if summary.decisions %}
<table id="by-source">
  <thead><tr><th>source</th>
  {% for s in statuses %}<th class="num">{{ s }}</th>{% endfor %}
  {% for v in verdicts %}<th class="num">changes {{ v }}</th>{% endfor %}</tr></thead>
  <tbody>
  {% for source in summary.sources %}<tr data-source="{{ source }}">
    <td>{{ dot(source) }}{{ source }}</td>
    {% for s in statuses %}<td class="num" data-status="{{ s }}">
      {{ summary.by_status[(source, s)] }}</td>{% endfor %}
    {% for v in verdicts %}<td class="num" data-verdict="{{ v }}">
      {{ summary.by_verdict[(source, v)] }}</td>{% endfor %}</tr>
  {% endfor %}
  </tbody>
</table>
{% endif %}

<h2>Plots</h2>
<p class="legend">Dotted line: where a decision was issued; solid: where the training process
applied it; colour: who decided
(<span class="source" style="background:{{ colours.llm }}"></span>llm,
<span class="source" style="background:{{ colours.rules }}"></span>rules,
<span class="source" style="background:{{ colours.human }}"></span>human). Grey dashed: advisory
(nothing was applied). Green ◀: rollback to the best state; red ■: stop; red ×: a rejected
proposal.</p>
{% for plot in plots %}
<figure id="plot-{{ plot.name }}"><img src="data:image/png;base64,{{ encode(plot.png) }}"
  width="{{ plot.width }}" height="{{ plot.height }}" alt="{{ plot.title }}">
  <figcaption>{{ plot.title }}</figcaption></figure>
{% endfor %}

<h2>Decisions</h2>
{% if not rows %}<p>No decisions yet.</p>{% else %}
<table id="decisions">
<thead><tr><th>decision</th><th class="num">step</th><th>by</th><th>status</th>
<th>proposed</th><th>verdicts</th><th>reason</th><th>objective before → after</th>
<th>model call</th></tr></thead>
<tbody>
{% for row in rows %}
<tr id="{{ row.label }}" class="row-{{ row.status }}" data-decision="{{ row.decision_id }}"
    data-status="{{ row.status }}" data-source="{{ row.source }}">
  <td><code>{{ row.label }}</code></td>
  <td class="num">{{ row.step if row.step is not none else "?" }}
    {%- if row.applied_step is not none %}
    <br><span class="why">applied @ {{ row.applied_step }}</span>{% elif row.superseded %}
    <br><span class="why">superseded before applied</span>{% elif row.status == "issued" %}
    <br><span class="why">not applied yet</span>{% endif %}</td>
  <td>{{ dot(row.source) }}{{ row.source }}{% if row.policy != row.source %}
    <span class="why">via {{ row.policy }}</span>{% endif %}{% if row.model %}
    <br><span class="why">{{ row.model }}</span>{% endif %}</td>
  <td class="status st-{{ row.status }}">{{ row.status }}{% if row.version %}
    v{{ row.version }}{% endif %}</td>
  <td>{% for p in row.proposed %}<div>{{ p }}</div>{% else %}-{% endfor %}</td>
  <td><ul class="v">{% for v in row.verdicts %}
    <li data-what="{{ v.what }}" data-verdict="{{ v.verdict }}">{{ v.what }}
      <span class="verdict {{ v.verdict }}">{{ v.verdict }}</span>
      {% if v.change %}{{ v.change }}{% endif %}
      {% if v.reason %}<div class="why">{{ v.reason }}</div>{% endif %}</li>
  {% endfor %}</ul></td>
  <td>{{ row.reason }}{% if row.error %}<div class="error">{{ row.error }}</div>{% endif %}</td>
  <td class="outcome" data-before="{{ num(row.before) }}" data-after="{{ num(row.after) }}">
    {{ g(row.before) }} → {% if row.measured %}{{ g(row.after) }}
    <span class="why">({{ delta(row) }})</span>{% else %}<span class="why">not measured</span>
    {% endif %}</td>
  <td>{% if row.tokens is not none %}{{ "%.2f" | format(row.latency_s or 0) }} s<br>
    <span class="why">{{ row.tokens }} tokens{% if row.attempts %}, {{ row.attempts }}
    attempt(s){% endif %}</span>{% else %}-{% endif %}</td>
</tr>
{% endfor %}
</tbody>
</table>
{% endif %}
{% endblock %}
"""

_EXPERIMENT = """{% extends "base" %}{% block body %}
<h1>Experiment {{ experiment }}: managed and unmanaged runs</h1>
<p class="meta">{{ runs | length }} run(s)</p>
<figure id="plot-{{ plot.name }}"><img src="data:image/png;base64,{{ encode(plot.png) }}"
  width="{{ plot.width }}" height="{{ plot.height }}" alt="{{ plot.title }}">
  <figcaption>{{ plot.title }}</figcaption></figure>
<table id="runs">
<thead><tr><th>run</th><th>managed</th><th>status</th><th>objective</th>
<th class="num">best</th><th class="num">final</th><th class="num">decisions</th>
<th class="num">interventions</th></tr></thead>
<tbody>
{% for data, summary in runs %}
<tr data-run="{{ data.run.run_id }}" data-managed="{{ data.managed | lower }}">
  <td>{{ data.name }}<br><code class="why">{{ data.run.run_id }}</code>{% include "notes" %}</td>
  <td>{{ "managed" if data.managed else "unmanaged" }}</td>
  <td>{{ data.run.status | lower }}</td><td><code>{{ data.objective }}</code></td>
  <td class="num" data-best="{{ num(summary.best[1] if summary.best else none) }}">
    {{ point(summary.best) }}</td>
  <td class="num" data-final="{{ num(summary.final[1] if summary.final else none) }}">
    {{ point(summary.final) }}</td>
  <td class="num">{{ summary.decisions }}</td><td class="num">{{ summary.issued }}</td>
</tr>
{% endfor %}
</tbody>
</table>
{% endblock %}
"""

# What the manager cannot do for the run, and what the report cannot show: where it shows first.
_NOTES = """{% if data.health and not data.health.ok %}
<p class="health" data-health="{{ data.health.state.value }}"><b>Not deciding:
  {{ data.health.state.value }}</b>{% if data.health.reason %} — {{ data.health.reason }}
  {%- endif %}</p>
{% endif %}
{% for remark in data.remarks %}
<p class="error" data-remark>{{ remark }}</p>
{% endfor %}
"""

_ENV = jinja2.Environment(
    loader=jinja2.DictLoader(
        {"base": _BASE, "run": _RUN, "experiment": _EXPERIMENT, "notes": _NOTES}
    ),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _g(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"


def _num(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else repr(float(x))


def _point(p: tuple[int, float] | None) -> str:
    return "-" if p is None else f"{p[1]:.4g} @ {p[0]}"


def _delta(row: Row) -> str:
    if row.before is None or row.after is None:
        return "?"
    return f"{row.after - row.before:+.3g}"


def _dot(source: str) -> Markup:
    colour = COLOURS.get(source, "#000")
    return Markup('<span class="source" style="background:{}"></span>').format(colour)


_ENV.globals.update(
    g=_g,
    num=_num,
    point=_point,
    delta=_delta,
    dot=_dot,
    ratio=ratio,
    times=ratio_text,
    encode=lambda png: base64.b64encode(png).decode("ascii"),
    statuses=STATUSES,
    verdicts=VERDICTS,
    colours=COLOURS,
)


def run_page(
    data: RunData,
    rows: list[Row],
    summary: Summary,
    plots: list[Plot],
    baseline: Baseline | None = None,
) -> str:
    """The report page of one run (beside its baseline, if any)."""
    return _ENV.get_template("run").render(
        title=f"atm report: {data.name}",
        data=data,
        rows=rows,
        summary=summary,
        plots=plots,
        baseline=baseline,
        made_at=_now(),
    )


def experiment_page(experiment: str, runs: list[tuple[RunData, Summary]], plot: Plot) -> str:
    """The page comparing the runs of an experiment."""
    return _ENV.get_template("experiment").render(
        title=f"atm report: experiment {experiment}",
        experiment=experiment,
        runs=runs,
        plot=plot,
        made_at=_now(),
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
