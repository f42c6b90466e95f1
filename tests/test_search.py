"""Searches (sweep/search.py): the space validated before any trial, a Tune search on a toy objective that
finds its known optimum (Optuna's TPE + ASHA), a killed search resumed without running a trial twice, and
the report of a search. The trials are toys (sweep.testing.toy_search_body): no data, no training."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sweep.cli import main
from sweep.spec import SpecError, parse_spec

BASE = {"name": "toy", "dataset": {"name": "synthetic", "train_size": 1000, "test_size": 100},
        "model": "small_cnn", "attacks": [{"name": "badnets"}], "defenses": [{"name": "none"}]}
SEARCH = {"defense": "ibau",
          "space": {"lr": {"loguniform": [1e-4, 1e-1]}, "portion": {"uniform": [0.05, 0.95]}},
          "objective": {"metric": "asr", "max_ca_drop": 5}, "num_samples": 4}


def spec(**search):
    return parse_spec({**BASE, "search": {**SEARCH, **search}})


# --- the space, validated before any trial -----------------------------------------------------------

@pytest.mark.parametrize("space,field,words", [
    ({"lr": {"uniform": [1e-2, 1e-3]}}, "search.space.lr", "low must be below high"),
    ({"lr": {"loguniform": [0, 1e-2]}}, "search.space.lr", "low must be > 0"),
    ({"lr": {"uniform": [1e-3, 1e-2], "int": [1, 2]}}, "search.space.lr", "exactly one"),
    ({"rounds": {"int": [1.5, 4]}}, "search.space.rounds.int[0]", "valid integer"),
    ({"rounds": [1, 4]}, "search.space.rounds", "a search range is a mapping"),
    ({"clean_size": {"choice": []}}, "search.space.clean_size", "empty"),
    ({"learning_rate": {"uniform": [0.1, 1]}}, "search.space.learning_rate", "not a parameter of ibau"),
    # a value the defense's own Params refuse at a bound: portion is a fraction in (0, 1]
    ({"portion": {"uniform": [0.5, 1.5]}}, "search.space.portion", "less than or equal to 1 (at 1.5)"),
    ({"rounds": {"int": [0, 4]}}, "search.space.rounds", "greater than or equal to 1 (at 0)"),
    # a bound the data cannot give: 1,000 images, BadNets poisons 100 of them
    ({"clean_size": {"int": [100, 950]}}, "search.space.clean_size", "larger than the clean pool (900 images)"),
    ({"clean_size": {"choice": [100, "two_shot"]}}, "search.space.clean_size", "two_shot"),
])
def test_a_bad_search_space_is_a_spec_error_naming_the_field(space, field, words):
    with pytest.raises(SpecError) as e:
        spec(space=space)
    assert any(f == field and words in m for f, m in e.value.problems), e.value.problems


@pytest.mark.parametrize("search,field,words", [
    ({"objective": {"metric": "accuracy"}}, "search.objective.metric", "'asr'"),
    ({"defense": "nodefense"}, "search.defense", "unknown defense"),
    ({"defense": {"name": "ibau", "K": 0}}, "search.defense.K", "greater than or equal to 1"),
    ({"defense": {"name": "ibau", "lr": 0.01}}, "search.space.lr", "also fixed"),
    ({"searcher": "bayes"}, "search.searcher", "'optuna'"),
    ({"num_samples": 0}, "search.num_samples", "greater than or equal to 1"),
    ({"scheduler": {"asha": {"grace_period": 4, "max_t": 2}}}, "search.scheduler.asha", "max_t"),
])
def test_bad_search_settings_are_spec_errors_naming_the_field(search, field, words):
    with pytest.raises(SpecError) as e:
        spec(**search)
    assert any(f == field and words in m for f, m in e.value.problems), e.value.problems


def test_a_missing_searcher_package_names_the_field_and_the_install(monkeypatch):
    import sweep.search as s

    monkeypatch.setattr(s, "_has_module", lambda name: name != "optuna")
    with pytest.raises(SpecError) as e:
        spec()
    (field, msg), = e.value.problems
    assert field == "search.searcher" and "pip install -e '.[search]'" in msg


def test_the_cli_exits_2_on_a_bad_space_and_validate_describes_a_good_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "search": {**SEARCH, "num_samples": 4,
                                                      "space": {"lr": {"loguniform": [0, 1]}}}}))
    r = CliRunner().invoke(main, ["validate", str(bad)])
    assert r.exit_code == 2 and "search.space.lr: loguniform: low must be > 0" in r.output, r.output
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**BASE, "search": {**SEARCH, "num_samples": 4}}))
    r = CliRunner().invoke(main, ["validate", str(good)])
    assert r.exit_code == 0 and "1 grid trials, 1 × 4 searched trials" in r.output, r.output


def test_a_search_spec_survives_the_saved_spec_yaml():
    """``sweep resume`` re-reads DIR/spec.yaml: the search (with its ``int:`` ranges) must parse back equal."""
    s = spec(num_samples=4, space={"rounds": {"int": [1, 5]}, "clean_size": {"choice": [100, "one_shot"]}},
             scheduler="asha")
    assert parse_spec(yaml.safe_load(yaml.safe_dump(s.model_dump(mode="json")))) == s


def test_a_searched_trial_has_its_own_id_and_aliases():
    """A searched configuration is a trial as ``expand`` would make it: its id hashes its model and its
    defense, and its aliases are its defense's (I-BAU at projected_map False has one), not those of the
    group's base trial."""
    from sweep.search import groups
    from sweep.spec import Variant, content_hash, legacy_ids

    (g,) = groups(spec())
    t = g.trial({"lr": 1e-3, "portion": 0.1})
    assert t.trial_id == content_hash({"model_key": g.key, "defense": t.defense.as_dict()})
    assert t.aliases == legacy_ids(g.key, t.defense) and len(t.aliases) == 1
    before = {k: v for k, v in t.defense.params.items() if k != "projected_map"}
    assert t.aliases[0] == content_hash({"model_key": g.key, "defense": Variant("ibau", before).as_dict()})


def test_the_objective_penalises_a_ca_drop_past_the_limit():
    from sweep.search import objective_value

    o = {"metric": "asr", "mode": "min", "max_ca_drop": 3}
    assert objective_value(o, {"asr": 0.2, "clean_acc": 0.68, "attack_clean_acc": 0.70}) == pytest.approx(0.2)
    over = objective_value(o, {"asr": 0.0, "clean_acc": 0.60, "attack_clean_acc": 0.70})  # 10 points: 7 over
    assert over == pytest.approx(1.07) and over > 1  # worse than any trial within the limit
    der = {"metric": "der", "mode": "max", "max_ca_drop": None}
    assert objective_value(der, {"asr": 0.1, "attack_asr": 1.0, "clean_acc": 0.7, "attack_clean_acc": 0.7}) == \
        pytest.approx(0.95)
    assert objective_value(der, {"asr": 0.1, "clean_acc": 0.7}) is None  # no before-defense figures


# --- a search on a toy objective ---------------------------------------------------------------------

N = 24


@pytest.fixture(scope="module")
def toy_search(tmp_path_factory):
    """TPE + ASHA, one trial at a time (so the search is deterministic), on the toy whose constrained
    optimum is lr = 10^-2.5, portion = 0.5 (ASR 0.25 at a CA drop of 5 points)."""
    from sweep.runner import run_sweep
    from sweep.testing import toy_search_body

    results = tmp_path_factory.mktemp("search") / "res"
    s = spec(num_samples=N, max_concurrent=1, seed=0, scheduler={"asha": {"grace_period": 1, "reduction_factor": 2}})
    summary = run_sweep(s, results, progress=False, body=toy_search_body)
    from sweep.results import load

    return results, summary, load(results)


def test_a_search_finds_the_known_optimum_and_asha_stops_the_worst(toy_search):
    results, summary, df = toy_search
    assert (summary.trials, summary.ran, summary.failed) == (N + 1, N + 1, 0)
    rows = df[df.search == "ibau_search"]
    assert len(rows) == N and rows.trial_id.is_unique and (rows.defense == "ibau").all()
    assert (df[df.search.isna()].defense == "none").all()  # the grid row beside it
    stopped = rows[rows.status == "stopped"]
    assert 0 < len(stopped) < N // 2, rows.status.value_counts()  # ASHA stopped some on their reports
    assert stopped.search_rank.isna().all() and stopped.asr.notna().all()
    ok = rows[rows.status == "ok"].sort_values("search_rank")
    assert list(ok.search_rank) == list(range(1, len(ok) + 1))
    assert (ok.search_objective.diff().dropna() >= 0).all()  # rank 1 = the lowest objective
    best = ok.iloc[0]
    drop = 100 * (best.attack_clean_acc - best.clean_acc)
    assert drop <= 5 and best.search_objective == pytest.approx(best.asr)  # within the CA limit: no penalty
    assert 0.3 <= best["defense.portion"] <= 0.5 and abs(math.log10(best["defense.lr"]) + 2.5) < 0.6
    assert best.asr < 0.4  # the optimum is 0.25; the median trial's ASR is about twice that
    # a trial past the CA limit scores worse than every trial within it, whatever its ASR
    over = ok[100 * (ok.attack_clean_acc - ok.clean_acc) > 5 + 1e-9]
    if len(over):
        assert over.search_objective.min() > ok[~ok.index.isin(over.index)].search_objective.max()
    # the searched parameters are ordinary columns; every other I-BAU parameter is its default
    assert rows["defense.rounds"].eq(5).all() and rows["defense.clean_size"].notna().all()


def test_a_search_re_run_runs_nothing(toy_search):
    from sweep.runner import run_sweep
    from sweep.testing import toy_search_body

    results, _, df = toy_search
    s = spec(num_samples=N, max_concurrent=1, seed=0, scheduler={"asha": {"grace_period": 1, "reduction_factor": 2}})
    again = run_sweep(s, results, progress=False, body=toy_search_body)
    assert again.ran == 0 and again.skipped == N + 1
    calls = (results / "store" / "calls.log").read_text().split()
    assert len(calls) == len(set(calls)) == N + 1


def test_the_report_of_a_search_renders(toy_search):
    from sweep.report import write_report

    results, _, df = toy_search
    md = write_report(results, "md")
    text = md.read_text()
    assert "## Search" in text and "ibau over lr, portion; min asr with CA drop <= 5 points" in text
    assert "ibau (ibau_search best)" in text  # the best trial as the search's column of the tables
    best = df[(df.search == "ibau_search") & (df.search_rank == 1)].iloc[0]
    assert best.trial_id in text
    for fig in ("search_ibau_search_objective.png", "search_ibau_search_parallel.png", "tradeoff.png"):
        assert (md.parent / fig).stat().st_size > 10_000, fig
    assert not list(md.parent.glob("vs_*.png"))  # no per-parameter plots of the searched trials
    html = write_report(results, "html").read_text()
    assert "<h2>Search ibau_search</h2>" in html and html.count("data:image/png;base64,") == 3
    r = CliRunner().invoke(main, ["report", str(results)])
    assert r.exit_code == 0 and best.trial_id in r.output and "failed trial" not in r.output, r.output


# --- a killed search, resumed ------------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import os, sys, yaml
    from sweep import runner
    from sweep.spec import parse_spec
    from sweep.testing import toy_search_body

    kill_after, seen = int(sys.argv[3]), []
    record = runner._Sink._record

    def record_then_die(self, row, *a, **k):
        record(self, row, *a, **k)
        if row.get("search"):
            seen.append(row["trial_id"])
            if len(seen) == kill_after:
                self.writer.flush()  # these rows reach the disk; then the driver is gone, as by SIGKILL
                os._exit(9)

    runner._Sink._record = record_then_die
    spec = parse_spec(yaml.safe_load(open(sys.argv[1])))
    runner.run_sweep(spec, sys.argv[2], progress=False, body=toy_search_body)
    sys.exit(3)  # not killed: the test fails
""")


def test_a_killed_search_resumed_finishes_its_budget_without_running_a_trial_twice(tmp_path):
    from sweep.results import load
    from sweep.runner import run_sweep
    from sweep.search import groups, history
    from sweep.testing import toy_search_body

    n, kill_after = 10, 4
    raw = {**BASE, "name": "killed", "search": {**SEARCH, "num_samples": n, "max_concurrent": 2, "seed": 1}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    results = tmp_path / "res"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "spec.yaml"), str(results), str(kill_after)],
                       cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 9, p.stdout[-3000:] + p.stderr[-3000:]
    before = load(results)
    searched = before[before.search.notna()]
    assert len(searched) == kill_after and (searched.status == "ok").all()
    s = parse_spec(raw)
    (g,) = groups(s)
    h = history(results, g)
    assert h.used == kill_after and all(cfg is not None for cfg, _ in h.points)  # what the searcher is told

    summary = run_sweep(s, results, progress=False, body=toy_search_body)
    assert summary.ran == n - kill_after
    df = load(results)
    rows = df[df.search == "ibau_search"]
    assert len(rows) == n and rows.trial_id.is_unique and (rows.status == "ok").all()
    assert set(searched.trial_id) <= set(rows.trial_id)
    calls = (results / "store" / "calls.log").read_text().split()
    assert len(calls) == len(set(calls)), "a trial ran twice"
    # every row's trial ran once; at most the trials in flight at the kill (2) ran without leaving a row
    assert set(df.trial_id) <= set(calls) and len(calls) - len(df) <= 2
    assert sorted(rows.search_rank.dropna().astype(int)) == list(range(1, n + 1))
