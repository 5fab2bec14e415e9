"""server/deploy against a real Prometheus: the shipped rules pass
promtool and their unit tests, and a Prometheus started here from the
shipped scrape config sees a live covey-server commit, evaluates every
alert rule, and can run every query of the Grafana dashboard."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.parse
import urllib.request

from conftest import MNIST, ROOT, need
from local_server import eventually, free_tcp_port

DEPLOY = ROOT / "server" / "deploy"


def test_shipped_rules_and_config_pass_promtool():
    promtool = need("promtool", "prometheus")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"],
                 ["check", "config", "prometheus.yml"]):
        out = subprocess.run([promtool, *args], cwd=DEPLOY, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout + out.stderr


def api(base: str, path: str, **params) -> dict:
    url = f"{base}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def query(base: str, expr: str) -> list:
    return api(base, "query", query=expr)["result"]


def test_prometheus_scrapes_a_live_server_and_runs_every_shipped_query(federation, tmp_path):
    prometheus = need("prometheus", "prometheus")
    federation.init("--model", "logreg", "--rounds", "100000", "--clients-per-round", "2",
                    "--test-data", str(MNIST))
    ids = [federation.enroll(f"device-{i}") for i in range(2)]
    federation.start()
    clients = [federation.rust_client(i, MNIST) for i in ids]

    # The shipped config, pointed at this server, scraping every second.
    config = (DEPLOY / "prometheus.yml").read_text()
    config = config.replace('"127.0.0.1:9464"', f'"{federation.metrics}"')
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
    config = config.replace("evaluation_interval: 15s", "evaluation_interval: 1s")
    config = config.replace("- alerts.yml", f"- {DEPLOY / 'alerts.yml'}")
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_tcp_port()
    prom = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def committed():
            try:
                found = query(base, "covey_model_version")
            except OSError:
                return False
            return bool(found) and float(found[0]["value"][1]) >= 2
        eventually(committed, 90, every=0.5)
        # Central evaluation reached Prometheus too.
        accuracy = query(base, "covey_test_accuracy")
        assert accuracy and 0.5 < float(accuracy[0]["value"][1]) <= 1.0, accuracy

        # Every rule loaded and evaluates cleanly against live data.
        def evaluated():
            groups = api(base, "rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return len(rules) == 5 and all(r["health"] == "ok" for r in rules)
        eventually(evaluated, 30, every=0.5)
        # A run that commits is not stalled.
        assert not [a for a in api(base, "alerts")["alerts"]
                    if a["labels"]["alertname"] == "CoveyRunStalled"]

        # Every series the dashboards and alerts name is one the server
        # exports: seen by Prometheus, or declared by the endpoint (a
        # labelled family has no series before its first event).
        exported = {r["metric"]["__name__"] for r in query(base, '{__name__=~"covey_.+"}')}
        with urllib.request.urlopen(f"http://{federation.metrics}/metrics", timeout=10) as r:
            exposition = r.read().decode()
        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
            exported.update(name + s for s in suffixes.get(kind, [""]))
        grafana = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for p in grafana["panels"] for t in p["targets"]]
        rules_text = (DEPLOY / "alerts.yml").read_text()
        named = set(re.findall(r"covey_[a-z_]+", " ".join(exprs) + rules_text))
        missing = named - exported
        assert not missing, f"named but not exported: {missing}; exported: {sorted(exported)}"
        # And Prometheus can run each Grafana query.
        for expr in exprs:
            api(base, "query", query=expr)
    finally:
        prom.send_signal(signal.SIGTERM)
        prom.communicate(timeout=30)
        federation.server.send_signal(signal.SIGINT)
        federation.server.wait(timeout=60)
        for c in clients:
            c.kill()
            c.wait()
