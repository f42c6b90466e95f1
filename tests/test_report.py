"""Reports and the MLflow UI, on a real small sweep (2 attacks × 3 defenses × 2 seeds, clean_size swept).

The UI test starts `sweep ui` (a real MLflow server) on the sweep's store, finds the runs through MLflow's
client over HTTP, and renders the experiment page in headless Chromium (Debian's `chromium`, driven by
Playwright). Set BDSWEEP_UI_SCREENSHOT=path to keep the screenshot (docs/mlflow_ui.png was made so).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser

import pandas as pd
import pytest
import yaml
from pathlib import Path
from click.testing import CliRunner

from sweep.cli import main
from sweep.report import with_der

SPEC = {
    "name": "reportsweep",
    "dataset": {"name": "synthetic", "train_size": 600, "test_size": 200},
    "model": "small_cnn",
    "train": {"epochs": 2},
    "seeds": [0, 1],
    "attacks": [{"name": "badnets"}, {"name": "blend"}],
    "defenses": [{"name": "none"}, {"name": "finetune", "clean_size": [50, 100], "epochs": 1},
                 {"name": "ibau", "clean_size": 50, "rounds": 1}],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    (d / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    r = CliRunner().invoke(main, ["run", str(d / "spec.yaml"), "--results", str(d / "res"), "--quiet"])
    assert r.exit_code == 0, r.output
    return d / "res"


class _Tables(HTMLParser):
    """The <table>s of an HTML page as lists of rows of cell texts, keyed by their CSS class."""

    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self._cls, self._row, self._cell = {}, [], None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            classes = [c for c in a.get("class", "").split() if c != "dataframe"]  # pandas' own class
            self._cls = next((c for c in classes if c.startswith("metric-")), classes[0] if classes else "table")
            self.tables[self._cls] = []
        elif tag == "tr" and self._cls:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.imgs.append(a.get("alt"))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._cls].append(self._row)
            self._row = None
        elif tag == "table":
            self._cls = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_html_report_numbers_match_pandas_on_the_parquet(results, tmp_path):
    out = tmp_path / "r.html"
    r = CliRunner().invoke(main, ["report", str(results), "--format", "html", "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = _Tables()
    page.feed(out.read_text())
    # every plot is embedded: each swept hyperparameter, the trade-off, and the triggers I-BAU recovered
    assert {"vs_defense_clean_size", "tradeoff", "triggers"} <= set(page.imgs)

    df = with_der(pd.read_parquet(results / "trials"))
    ok = df[df.status == "ok"]
    assert len(ok) == 2 * 4 * 2
    label = {50: "finetune(clean_size=50)", 100: "finetune(clean_size=100)"}
    sign = {"ca_change": "+"}  # ΔCA is signed, with a true minus sign
    for metric, scale, digits in (("clean_acc", 100, 1), ("ca_change", 100, 1), ("asr", 100, 1),
                                  ("robust_acc", 100, 1), ("der", 1, 3)):
        rows = page.tables[f"metric-{metric}"]
        header = rows[0]
        body = {r[0]: dict(zip(header[1:], r[1:])) for r in rows[1:]}
        fmt = sign.get(metric, "")
        for (attack, defense, cs), g in ok.groupby(["attack", "defense", "defense.clean_size"], dropna=False):
            col = label[int(cs)] if defense == "finetune" else defense
            vals = g[metric].astype(float)
            if metric == "ca_change":  # computed here from the row's own before/after figures
                assert (vals == g.clean_acc.astype(float) - g.attack_clean_acc.astype(float)).all()
            expect = f"{scale * vals.mean():{fmt}.{digits}f}".replace("-", "−") + f" ± {scale * vals.std():.{digits}f}"
            assert body[attack][col] == expect, (metric, attack, col)
        # the Average row: mean over attacks of the per-attack means
        means = ok[ok.defense == "none"].groupby("attack")[metric].mean().astype(float)
        assert body["Average"]["none"] == f"{scale * means.mean():{fmt}.{digits}f}".replace("-", "−")
    assert set(page.tables["metric-ca_change"][1][1:]) != {"+0.0 ± 0.0"}  # the defenses changed the CA


def test_md_and_csv_reports_write_figures_beside(results, tmp_path):
    for fmt in ("md", "csv"):
        out = tmp_path / fmt / f"report.{fmt}"
        r = CliRunner().invoke(main, ["report", str(results), "--format", fmt, "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert {"tradeoff.png", "vs_defense_clean_size.png", "triggers.png"} <= {p.name for p in out.parent.iterdir()}
    md = (tmp_path / "md" / "report.md").read_text()
    assert "## ASR" in md and "![tradeoff](tradeoff.png)" in md
    tidy = pd.read_csv(tmp_path / "csv" / "report.csv")
    assert set(tidy.metric) == {"clean_acc", "ca_change", "asr", "robust_acc", "der"}
    assert (tidy.n == 2).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_ui_shows_the_sweep(results):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from mlflow.tracking import MlflowClient

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "sweep.cli", "ui", str(results), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()
                time.sleep(1)
        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("reportsweep")
        parents = client.search_runs([exp.experiment_id], "tags.`bdsweep.role` = 'sweep'")
        children = client.search_runs([exp.experiment_id], "tags.`bdsweep.role` = 'trial'", max_results=1000)
        assert len(parents) == 1 and len(children) == 2 * 4 * 2
        assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs", timeout=60_000)
            # The React app fetches the runs from the API and renders the runs table: the sweep's parent
            # run by name (its trials nest under it) and the count of every run of the experiment.
            page.get_by_text(f"{1 + len(children)} matching runs").first.wait_for(timeout=60_000)
            page.get_by_role("link", name="reportsweep").first.wait_for(timeout=60_000)
            shot = os.environ.get("BDSWEEP_UI_SCREENSHOT")
            if shot:
                page.wait_for_timeout(2000)
                page.screenshot(path=shot)
            assert "reportsweep" in page.content()
            browser.close()
    finally:
        os.killpg(server.pid, 15)
        server.wait(10)


def test_ui_binds_to_localhost_by_default():
    r = CliRunner().invoke(main, ["ui", "--help"])
    assert "127.0.0.1" in " ".join(r.output.split())  # the default interface, shown by --help


def test_example_script_rebuilds_the_table_from_parquet_alone(results):
    script = Path(__file__).resolve().parents[1] / "examples" / "paper_table.py"
    r = subprocess.run([sys.executable, str(script), str(results)], capture_output=True, text=True, check=True)
    df = pd.read_parquet(results / "trials")
    asr = df[(df.status == "ok") & (df.attack == "blend") & (df.defense == "none")].asr.astype(float)
    blend = next(line for line in r.stdout.splitlines() if line.startswith("blend"))
    assert f"{100 * asr.mean():.1f} ± {100 * asr.std():.1f}" in blend


def test_a_parameter_left_at_its_default_still_tells_variants_apart():
    """ABL's turning_epoch is null (the sweep's epochs) in one variant and 10 in another: two columns. A
    label names what a variant sets away from ABL's defaults (gamma 0.5, turning_epoch null); a method
    the registry does not know (rows of a removed one) is named by everything that varies."""
    from sweep.report import variant_labels

    df = pd.DataFrame({"defense": ["abl", "abl", "abl"], "defense.gamma": [0.5, 0.5, 1.0],
                       "defense.turning_epoch": [None, 10.0, None]})
    assert list(variant_labels(df, "defense")) == ["abl", "abl(turning_epoch=10)", "abl(gamma=1)"]
    df["defense"] = "gone"
    assert list(variant_labels(df, "defense")) == ["gone(gamma=0.5, turning_epoch=default)",
                                                   "gone(gamma=0.5, turning_epoch=10)",
                                                   "gone(gamma=1, turning_epoch=default)"]


def test_labels_name_departures_from_the_defaults_and_the_papers_axes_always():
    """The seeds table's I-BAU columns: the defaults at four clean-set sizes, one at outer lr 3e-4, one of
    an older version's defaults (portion 0.1, augment). Only departures are named, clean_size (an axis)
    always; every variant keeps a label of its own. Values held as JSON text (a column of mixed types)
    compare as their values."""
    from defenses import DEFENSES
    from sweep.report import variant_labels

    d = DEFENSES.get("ibau").Params()
    rows = [(5000, d.lr, d.portion, d.augment), (500, d.lr, d.portion, d.augment),
            (5000, 3e-4, d.portion, d.augment), (5000, d.lr, 0.1, True), ("one_shot", d.lr, d.portion, d.augment)]
    df = pd.DataFrame({"defense": "ibau", "defense.augment": [r[3] for r in rows],  # columns sorted, as in rows
                       "defense.clean_size": [r[0] if isinstance(r[0], str) else json.dumps(r[0]) for r in rows],
                       "defense.lr": [r[1] for r in rows], "defense.portion": [r[2] for r in rows],
                       "defense.rounds": [d.rounds] * len(rows)})  # one value: never named
    labels = list(variant_labels(df, "defense"))
    assert labels == ["ibau(clean_size=5000)", "ibau(clean_size=500)", "ibau(clean_size=5000, lr=0.0003)",
                      "ibau(augment=True, clean_size=5000, portion=0.1)", "ibau(clean_size=one_shot)"]
    assert len(set(labels)) == len(labels)
    # rows written before a parameter existed hold null for it; they ran as its default does, so they share
    # the later rows' column (projected_map came in session 17; the seeds table split in two without this)
    df["defense.projected_map"] = [None, None, False, None, False]
    assert list(variant_labels(df, "defense")) == labels
    df.loc[1, "defense.projected_map"] = True
    assert variant_labels(df, "defense")[1] == "ibau(clean_size=500, projected_map=True)"
    # poison_rate is an axis too: named at its default where it varies
    att = pd.DataFrame({"attack": ["badnets", "badnets"], "attack.poison_rate": [0.1, 0.05]})
    assert list(variant_labels(att, "attack")) == ["badnets(poison_rate=0.1)", "badnets(poison_rate=0.05)"]


def test_only_parameters_swept_within_one_method_get_a_plot():
    """Two defenses at different default lrs do not make lr a swept parameter; clean_size varied within
    each defense does."""
    from sweep.plots import swept_params
    df = pd.DataFrame({
        "status": ["ok"] * 4, "attack": ["badnets"] * 4, "defense": ["ibau", "ibau", "awm", "awm"],
        "attack.poison_rate": [0.1] * 4, "defense.lr": [1e-3, 1e-3, 1e-2, 1e-2],
        "defense.clean_size": ["100", "500", "100", "500"], "defense.rounds": [5, 5, None, None]})
    assert swept_params(df) == ["defense.clean_size"]
    # lr now differs within ibau, but only between rows that also differ in clean_size: no line of an
    # lr plot would have two points, so lr gets none (clean_size still has awm's line)
    df.loc[1, "defense.lr"] = 1e-4
    assert swept_params(df) == ["defense.clean_size"]
    # an ibau run at the other lr and the same clean_size makes a line of two points
    df.loc[4] = {"status": "ok", "attack": "badnets", "defense": "ibau", "attack.poison_rate": 0.1,
                 "defense.lr": 1e-4, "defense.clean_size": "100", "defense.rounds": 5}
    assert swept_params(df) == ["defense.lr", "defense.clean_size"]


def test_parameters_that_change_together_between_listed_configurations_get_no_plot():
    """Three AWM configurations listed one by one (as examples/awm_one_shot_cifar10.yaml does), each
    on two seeds: rounds, lr_decay and clean_target change only together, so a plot against any of them
    would be one point per line. A grid over clean_size inside one configuration is still plotted."""
    from sweep.plots import swept_params
    configs = [dict(rounds=10, lr_decay=0.9, clean_target="label", trigger_inner=None),
               dict(rounds=10, lr_decay=0.9, clean_target="label", trigger_inner=30),
               dict(rounds=20, lr_decay=1.0, clean_target="teacher", trigger_inner=30)]
    rows = [{"status": "ok", "attack": "badnets", "defense": "awm", "seed": seed, "defense.clean_size": "one_shot",
             **{f"defense.{k}": v for k, v in cfg.items()}} for cfg in configs for seed in (0, 1)]
    df = pd.DataFrame(rows)
    assert swept_params(df) == []
    grid = pd.DataFrame([{**r, "defense.clean_size": "500"} for r in rows[:2]])
    assert swept_params(pd.concat([df, grid], ignore_index=True)) == ["defense.clean_size"]


def test_tradeoff_tells_configurations_of_one_defense_apart():
    """Two AWM configurations and I-BAU: three colours, labelled by variant; past max_variants the
    colours fall back to one per defense."""
    import matplotlib.pyplot as plt

    from sweep.plots import tradeoff
    rows = [{"status": "ok", "attack": "badnets", "defense": d, "defense.rounds": r, "seed": 0,
             "asr": 0.1, "clean_acc": 0.6, "attack_asr": 1.0, "attack_clean_acc": 0.7}
            for d, r in [("awm", 10), ("awm", 20), ("ibau", 5)]]
    df = pd.DataFrame(rows)
    fig = tradeoff(df)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["before defense", "awm", "awm(rounds=20)", "ibau"]  # 10 rounds: AWM's default
    plt.close(fig)
    fig = tradeoff(df, max_variants=2)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["before defense", "awm", "ibau"]
    plt.close(fig)


def test_trigger_images_from_read_only_arrays_log_without_warnings():
    # A Ray result hands a trial's recovered trigger back as a read-only numpy view of the object store;
    # the MLflow artifact must be the same image as from the tensor, with no non-writable-array warning.
    import warnings

    import numpy as np
    import torch

    from sweep.tracking import _to_numpy_image

    t = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = t.numpy().copy()
    a.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = _to_numpy_image(a)
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3)
    np.testing.assert_array_equal(img, _to_numpy_image(t))


PUBLISHED = """# a published cell per row; an empty selector matches any value
attack,defense,defense.clean_size,ca_before,asr_before,ca,asr,source,setting
badnets,finetune,50,84.94,97.64,83.08,9.36,a notebook,one round
badnets,finetune,,,,80.0,5.0,a table,any clean size
blend,ibau,,,,,50.53,BackdoorBench,PreAct-ResNet18
wanet,ibau,,,,90.0,2.0,nowhere,no rows of ours
"""


def test_published_figures_sit_beside_the_mean_of_our_matching_rows(results, tmp_path):
    from sweep.report import published_table, read_published
    from sweep.results import load

    (tmp_path / "pub.csv").write_text(PUBLISHED)
    df = load(results)
    t = published_table(df, read_published(tmp_path / "pub.csv"))
    assert list(t.defense) == ["finetune (clean_size=50)", "finetune", "ibau", "ibau"]
    ok = df[df.status == "ok"]
    sel = ok[(ok.attack == "badnets") & (ok.defense == "finetune") & (ok["defense.clean_size"].astype(str) == "50")]
    assert t.n.tolist() == [2, 4, 2, 0]  # two seeds; two seeds x two clean sizes; two seeds; none
    r = t.iloc[0]
    assert r["published CA"] == "84.9 → 83.1" and r["published ASR"] == "97.6 → 9.4"
    assert r["published ΔCA"] == "-1.9"
    assert r["ours CA"] == f"{sel.attack_clean_acc.mean() * 100:.1f} → {sel.clean_acc.mean() * 100:.1f}"
    assert r["ours ASR"] == f"{sel.attack_asr.mean() * 100:.1f} → {sel.asr.mean() * 100:.1f}"
    assert r["ours ΔCA"] == f"{(sel.clean_acc.mean() - sel.attack_clean_acc.mean()) * 100:+.1f}"
    assert r.source == "a notebook; one round"
    assert t.iloc[1]["published CA"] == "80.0" and t.iloc[1]["published ΔCA"] == "–"  # no before-figure
    assert t.iloc[3]["ours CA"] == "–"  # nothing of ours to set beside it

    out = tmp_path / "r.md"
    r = CliRunner().invoke(main, ["report", str(results), "--format", "md", "--out", str(out),
                                  "--published", str(tmp_path / "pub.csv")])
    assert r.exit_code == 0, r.output
    md = out.read_text()
    assert "## Published numbers beside ours" in md and "| badnets | finetune (clean_size=50) | 84.9 → 83.1 |" in md
    html_out = tmp_path / "r.html"
    r = CliRunner().invoke(main, ["report", str(results), "--format", "html", "--out", str(html_out),
                                  "--published", str(tmp_path / "pub.csv")])
    assert r.exit_code == 0, r.output
    p = _Tables()
    p.feed(html_out.read_text())
    assert p.tables["published"][1][:3] == ["badnets", "finetune (clean_size=50)", "84.9 → 83.1"]
    r = CliRunner().invoke(main, ["report", str(results), "--format", "csv", "--out", str(tmp_path / "r.csv"),
                                  "--published", str(tmp_path / "pub.csv")])
    assert r.exit_code == 0, r.output
    assert pd.read_csv(tmp_path / "published.csv").n.tolist() == [2, 4, 2, 0]  # beside the csv report
    r = CliRunner().invoke(main, ["report", str(results), "--published", str(tmp_path / "pub.csv")])
    assert r.exit_code == 0 and "Published figures beside ours" in r.output


@pytest.mark.parametrize("text,message", [
    ("attack,defense,ca\nbadnets,ibau,80\n", "missing column(s) source"),
    ("attack,defense,source,acc\nbadnets,ibau,x,80\n", "unknown column(s) acc"),
    ("attack,defense,source,asr\nbadnets,ibau,x,low\n", "column asr: 'low' is not a number"),
])
def test_a_malformed_published_file_is_refused_naming_the_column(results, tmp_path, text, message):
    (tmp_path / "bad.csv").write_text(text)
    r = CliRunner().invoke(main, ["report", str(results), "--published", str(tmp_path / "bad.csv")])
    assert r.exit_code == 2 and message in r.output, r.output


def test_table_columns_follow_the_defenses_not_the_attacks():
    """A variant that only the last attack has (AWM at 5,000 on Trojan-WM) takes its place among AWM's
    columns, and clean sizes run one-shot, 100, 500, 5000 (numbers, not text: '5000' < '600' as text)."""
    from sweep.report import table

    rows = [("badnets", "awm", "500"), ("badnets", "awm", "100"), ("badnets", "ibau", "600"),
            ("trojan_wm", "awm", "5000"), ("trojan_wm", "awm", "one_shot"), ("trojan_wm", "ibau", "600")]
    df = pd.DataFrame([{"status": "ok", "attack": a, "defense": d, "defense.clean_size": cs, "seed": 0,
                        "clean_acc": 0.8, "asr": 0.1} for a, d, cs in rows]
                      + [{"status": "ok", "attack": a, "defense": "none", "seed": 0, "clean_acc": 0.8, "asr": 1.0}
                         for a in ("badnets", "trojan_wm")])
    t = table(df)
    assert [d for d, m in t.columns if m == "CA"] == [
        "none", "awm(clean_size=one_shot)", "awm(clean_size=100)", "awm(clean_size=500)",
        "awm(clean_size=5000)", "ibau"]  # one clean size within ibau: not named
    assert [m for d, m in t.columns][:4] == ["CA", "ASR", "CA", "ASR"]
    assert list(t.index) == ["badnets", "trojan_wm", "Average"]


def test_trigger_images_take_the_run_that_holds_one(tmp_path):
    """A variant's first trial may have a run without artifacts (its row imported from another machine,
    logged here at the next run's start); the figure takes the variant's image from a trial that has one."""
    import mlflow
    import numpy as np
    import pandas as pd

    from sweep.report import trigger_images

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.create_experiment("imp", artifact_location=str(tmp_path / "art"))
    for tid, image in (("t0", False), ("t1", True)):
        run = client.create_run(exp, tags={"bdsweep.role": "trial", "trial_id": tid})
        if image:
            client.log_image(run.info.run_id, np.full((4, 4, 3), 200, np.uint8), "trigger.png")
        client.set_terminated(run.info.run_id)
    df = pd.DataFrame({"sweep": "imp", "trial_id": ["t0", "t1"], "status": "ok", "attack": "badnets",
                       "defense": "awm", "seed": [0, 1]})
    images = trigger_images(df, uri)
    assert len(images) == 1 and images[0][0].endswith("trigger") and images[0][1][0, 0, 0] == 200
