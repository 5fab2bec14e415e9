// The dashboard page: one server-sent-event feed of JSON snapshots, drawn
// with uPlot. Every value from the server goes into the page as text, never
// as HTML.
"use strict";

const rounds = new Map();
const charts = {};
let facts = null;
// Federated evaluation by version: the latest answer for each.
let federated = new Map();

const $ = (id) => document.getElementById(id);

function setText(id, value) {
  $(id).textContent = value;
}

function fmtBytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function utc(ms) {
  return new Date(ms).toISOString().replace(".000Z", "Z");
}

function chart(id, series, yLabel) {
  if (charts[id]) return charts[id];
  const el = $(id);
  const opts = {
    width: Math.max(300, el.clientWidth || 400),
    height: 220,
    scales: { x: { time: false } },
    axes: [
      { label: id.startsWith("accuracy") || id.startsWith("loss") ? "version" : "round",
        // Versions and rounds are whole numbers.
        incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
        values: (u, ticks) => ticks.map((t) => String(Math.round(t))) },
      { label: yLabel },
    ],
    series: [{}, ...series],
  };
  charts[id] = new uPlot(opts, [[], ...series.map(() => [])], el);
  return charts[id];
}

function draw(id, series, yLabel, xs, ys) {
  const plot = chart(id, series, yLabel);
  plot.setData([xs, ...ys]);
  $(id).dataset.points = String(xs.length);
}

function table(id, rows) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    return tr;
  }));
}

function drawCharts() {
  const all = [...rounds.values()].sort((a, b) => a.round - b.round);
  // Rounds still in flight have no cohort or traffic yet.
  const lines = all.filter((l) => l.seconds !== null);
  const committed = lines.filter((l) => l.committed_version !== null);
  const lm = facts && facts.language_model;

  // One x axis of versions for central and federated figures alike.
  const central = new Map(committed.map((l) => [l.committed_version, l]));
  const versions = [...new Set([...central.keys(), ...federated.keys()])].sort((a, b) => a - b);
  const field = (v, name) => (central.has(v) ? central.get(v)[name] : null);
  const fed = (v, name) => (federated.has(v) ? federated.get(v)[name] : null);
  const accuracy = versions.filter((v) => field(v, "test_accuracy") !== null || fed(v, "accuracy") !== null);
  draw("accuracy-chart",
    [
      { label: "central test accuracy", stroke: "#1f77b4", width: 2, points: { show: true }, spanGaps: true },
      { label: "federated accuracy", stroke: "#2ca02c", width: 2, points: { show: true }, spanGaps: true },
    ],
    "accuracy",
    accuracy,
    [accuracy.map((v) => field(v, "test_accuracy")), accuracy.map((v) => fed(v, "accuracy"))]);
  const lossOf = (v) => (v === null ? null : (lm ? Math.exp(v) : v));
  $("loss-caption").textContent = lm ? "Perplexity by version" : "Loss by version";
  const losses = versions.filter((v) => field(v, "test_loss") !== null ||
    field(v, "mean_client_loss") !== null || fed(v, "loss") !== null);
  draw("loss-chart",
    [
      { label: lm ? "central test perplexity" : "central test loss", stroke: "#d62728", width: 2, spanGaps: true },
      { label: lm ? "devices' training perplexity" : "devices' training loss", stroke: "#ff7f0e", width: 1, spanGaps: true },
      { label: lm ? "federated perplexity" : "federated loss", stroke: "#2ca02c", width: 2, spanGaps: true },
    ],
    lm ? "perplexity" : "loss",
    losses,
    [losses.map((v) => lossOf(field(v, "test_loss"))), losses.map((v) => lossOf(field(v, "mean_client_loss"))),
      losses.map((v) => lossOf(fed(v, "loss")))]);

  const eps = lines.filter((l) => l.epsilon !== null);
  const target = facts && facts.epsilon_target;
  $("epsilon-caption").textContent = target === null ? "ε spent by round (no differential privacy in this run)" : "ε spent by round";
  draw("epsilon-chart",
    [{ label: "ε spent", stroke: "#9467bd", width: 2 }, { label: "target", stroke: "#999", dash: [6, 4] }],
    "ε",
    eps.map((l) => l.round),
    [eps.map((l) => l.epsilon), eps.map(() => target)]);

  const k = facts ? facts.min_cohort : null;
  draw("cohort-chart",
    [
      { label: "accepted", stroke: "#2ca02c", width: 2 },
      { label: "selected", stroke: "#8c564b" },
      { label: "dropped", stroke: "#d62728" },
      { label: "k", stroke: "#999", dash: [6, 4] },
    ],
    "devices",
    lines.map((l) => l.round),
    [lines.map((l) => l.accepted), lines.map((l) => l.selected), lines.map((l) => l.dropped),
      lines.map(() => k)]);

  draw("bytes-chart",
    [{ label: "up", stroke: "#17becf", width: 2 }, { label: "down", stroke: "#7f7f7f" }],
    "bytes",
    lines.map((l) => l.round),
    [lines.map((l) => l.bytes_up), lines.map((l) => l.bytes_down)]);

  const timed = lines.filter((l) => l.seconds !== null);
  draw("time-chart",
    [{ label: "seconds", stroke: "#e377c2", width: 2 }],
    "s",
    timed.map((l) => l.round),
    [timed.map((l) => l.seconds)]);

  const rejected = {};
  for (const l of lines) {
    for (const [reason, n] of Object.entries(l.rejected)) rejected[reason] = (rejected[reason] || 0) + n;
  }
  const rows = Object.entries(rejected).sort((a, b) => b[1] - a[1]).map(([r, n]) => [[r], [String(n)]]);
  table("rejections", rows.length ? rows : [[["none"], ["0"]]]);
}

function show(s) {
  facts = s.facts;
  if (s.rounds_reset) rounds.clear();
  for (const line of s.rounds) rounds.set(line.round, line);

  const live = s.live;
  federated = new Map();
  for (const outcome of live.federated_evaluations) {
    for (const v of outcome.versions) federated.set(v.version, v);
  }
  setText("model", `${facts.model}, ${facts.parameters.toLocaleString("en")} parameters, ${facts.mode}` +
    (facts.secure_aggregation ? ", secure aggregation" : ""));
  setText("viewer", s.viewer.signed_in ? `signed in as ${s.viewer.role}` : `${s.viewer.role}'s view (not signed in)`);
  $("sign-in").hidden = s.viewer.signed_in;
  $("sign-out").hidden = !s.viewer.signed_in;
  setText("version", String(live.version));
  setText("target", String(facts.target_version));
  setText("phase", live.phase + (live.round !== null ? ` (round ${live.round})` : "") +
    (live.secagg_phase ? `: ${live.secagg_phase}` : ""));
  const left = live.deadline_unix_ms === null ? null : Math.max(0, (live.deadline_unix_ms - s.server_time_unix_ms) / 1000);
  setText("deadline", left === null ? "" : `deadline in ${left.toFixed(0)} s`);
  setText("connected", String(live.connected));
  setText("selected", String(live.selected));
  setText("reported", String(live.reported));
  setText("rate", s.rounds_per_hour.toFixed(1));
  const committed = [...rounds.values()].filter((l) => l.epsilon !== null);
  const spent = committed.length ? committed[committed.length - 1].epsilon : null;
  setText("epsilon", facts.epsilon_target === null ? "no DP" : `ε ${spent === null ? "0" : spent.toFixed(3)}`);
  setText("epsilon-target", facts.epsilon_target === null ? "" :
    `of ${facts.epsilon_target} at δ ${facts.delta}`);
  setText("traffic", `↑ ${fmtBytes(s.totals.bytes_up)} ↓ ${fmtBytes(s.totals.bytes_down)}`);

  drawCharts();

  table("phases", Object.entries(s.phase_seconds).map(([p, t]) => [[p], [t.toFixed(3)]]));
  const all = live.federated_evaluations;
  const fe = all.length ? all[all.length - 1] : null;
  setText("federated", !fe ? "none yet" : fe.error ? `evaluation ${fe.id}: ${fe.error}` :
    fe.versions.map((v) => `v${v.version}: accuracy ${v.accuracy.toFixed(4)}, loss ${v.loss.toFixed(4)}`).join("; ") +
      ` (${fe.answered} of ${fe.asked} devices, ${fe.examples} examples)`);

  const badge = $("audit-state");
  badge.textContent = s.audit.verified ? `${s.audit.entries} entries verified` : `NOT VERIFIED: ${s.audit.problem}`;
  badge.className = s.audit.verified ? "badge ok" : "badge bad";
  table("audit", s.audit.latest.map((e) => {
    const { seq, time_unix_ms, prev, event, ...details } = e;
    return [[String(seq)], [utc(time_unix_ms)], [event], [JSON.stringify(details), "details"]];
  }));

  setText("device-counts", `${s.devices.active} active, ${s.devices.revoked} revoked, ${s.devices.expired} expired`);
  table("devices", s.devices.listed.map((d) => [[d.pseudonym], [d.name === null ? "(hidden)" : d.name], [d.role], [d.state]]));
}

function connect() {
  const feed = new EventSource("/api/events");
  feed.addEventListener("state", (e) => {
    show(JSON.parse(e.data));
    const banner = $("feed-state");
    banner.textContent = `Live, updated ${utc(Date.now())}`;
    banner.className = "banner ok";
  });
  feed.addEventListener("problem", (e) => {
    setText("feed-state", `The server cannot read its state: ${JSON.parse(e.data)}`);
  });
  feed.onerror = () => {
    const banner = $("feed-state");
    banner.textContent = "Disconnected from the server; retrying…";
    banner.className = "banner";
  };
}

connect();
