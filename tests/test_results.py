"""Parquet results: typed columns, batched parts, compaction to one row per trial."""
import pandas as pd
import pyarrow.parquet as pq
import yaml

from sweep.results import ResultsWriter, compact, finished_trials, load, schema_for
from sweep.spec import expand, parse_spec

SPEC = {"name": "r", "dataset": {"name": "synthetic", "train_size": 1000}, "model": "small_cnn",
        "attacks": [{"name": "badnets", "target": [0, "all"]}, {"name": "none"}],
        "defenses": [{"name": "none"}, {"name": "finetune", "clean_size": [100, "one_shot"], "epochs": [1, 2]}]}


def rows(trials, status="ok"):
    for i, t in enumerate(trials):
        yield {"sweep": "r", "trial_id": t.trial_id, "attack": t.attack.name, "defense": t.defense.name,
               "seed": t.seed, "status": status, "clean_acc": 0.5, "asr": None if t.attack.name == "none" else 0.9,
               "finished_at": f"2026-01-01T00:00:{i:02d}",
               **{f"attack.{k}": v for k, v in t.attack.params.items()},
               **{f"defense.{k}": v for k, v in t.defense.params.items()}}


def test_schema_types():
    s = schema_for(expand(parse_spec(SPEC)))
    assert str(s.field("attack.target").type) == "string"  # 0 and 'all'
    assert str(s.field("attack.poison_rate").type) == "double"
    assert str(s.field("attack.patch_size").type) == "int64"
    assert str(s.field("defense.epochs").type) == "int64"
    assert str(s.field("defense.clean_size").type) == "string"  # 100 and 'one_shot'


def test_batches_then_one_compacted_file(tmp_path):
    trials = expand(parse_spec(SPEC))
    w = ResultsWriter(tmp_path, schema_for(trials), flush_rows=3)
    for r in rows(trials):
        w.add(r)
    assert len(list((tmp_path / "trials").glob("part-*.parquet"))) == len(trials) // 3
    w.close()
    files = list((tmp_path / "trials").glob("*.parquet"))
    assert len(files) == 1
    df = pd.read_parquet(tmp_path / "trials")
    assert len(df) == len(trials) == df.trial_id.nunique()
    assert str(pq.read_schema(files[0]).field("attack.patch_size").type) == "int64"
    typed = load(tmp_path)
    assert str(typed["attack.patch_size"].dtype) == "Int64" and str(typed["seed"].dtype) == "Int64"
    assert set(df["attack.target"].dropna()) == {"0", "all"}
    assert finished_trials(tmp_path) == {t.trial_id for t in trials}


def test_rerun_replaces_failed_rows(tmp_path):
    trials = expand(parse_spec(SPEC))
    w = ResultsWriter(tmp_path, schema_for(trials))
    for r in rows(trials, "failed"):
        w.add(r)
    w.close()
    assert finished_trials(tmp_path, include_failed=False) == set()
    w = ResultsWriter(tmp_path, schema_for(trials))
    for r in rows(trials[:2]):
        r["finished_at"] = "2027-" + r["finished_at"][5:]
        w.add(r)
    w.close()
    df = load(tmp_path)
    assert len(df) == len(trials)
    assert (df.set_index("trial_id").loc[[t.trial_id for t in trials[:2]], "status"] == "ok").all()
    assert len(pq.ParquetDataset(tmp_path / "trials").files) == 1


def test_compact_is_noop_for_one_file(tmp_path):
    trials = expand(parse_spec(SPEC))
    w = ResultsWriter(tmp_path, schema_for(trials))
    w.add(next(rows(trials)))
    w.close()
    before = list((tmp_path / "trials").glob("*.parquet"))
    compact(tmp_path)
    assert list((tmp_path / "trials").glob("*.parquet")) == before


def test_types_merge_across_runs(tmp_path):
    """A column mixed in one run (string) and pure int in the next is read back as one string column."""
    first = expand(parse_spec(SPEC))
    w = ResultsWriter(tmp_path, schema_for(first, tmp_path))
    for r in rows(first):
        w.add(r)
    w.close()
    spec2 = {**SPEC, "seeds": [7], "defenses": [{"name": "finetune", "clean_size": 100}],
             "attacks": [{"name": "badnets", "target": 1, "poison_rate": 0.2}]}
    second = expand(parse_spec(spec2))
    schema = schema_for(second, tmp_path)
    assert str(schema.field("defense.clean_size").type) == "string"
    w = ResultsWriter(tmp_path, schema)
    for r in rows(second):
        w.add(r)
    w.flush()
    df = load(tmp_path)  # two parts, merged on read
    assert len(df) == len(first) + len(second)
    assert set(df["defense.clean_size"].dropna()) == {"100", "one_shot"}
    w.close()
    assert len(pd.read_parquet(tmp_path / "trials")) == len(first) + len(second)


def _written(tmp_path, trials):
    """Rows of ``trials`` compacted into their own results directory, as a committed piece would be."""
    w = ResultsWriter(tmp_path / "a", schema_for(trials))
    for r in rows(trials):
        w.add(r)
    w.close()
    return tmp_path / "a"


def test_import_adds_rows_once_and_keeps_the_latest(tmp_path):
    from sweep.results import import_rows

    trials = expand(parse_spec(SPEC))
    half = len(trials) // 2
    src = _written(tmp_path, trials[:half])  # a committed piece: half the spec
    committed = tmp_path / "committed.parquet"
    pd.read_parquet(src / "trials").to_parquet(committed)
    here = tmp_path / "here"  # a new machine's results: the other half, one row finished later than its import
    w = ResultsWriter(here, schema_for(trials))
    for i, r in enumerate(rows(trials)):
        if i >= half - 1:
            r["finished_at"], r["clean_acc"] = "2027-01-01T00:00:00", 0.75
            w.add(r)
    w.close()
    assert import_rows(here, [committed]) == (half, half - 1)
    df = load(here)
    assert len(df) == len(trials) and df.trial_id.is_unique
    assert finished_trials(here) == {t.trial_id for t in trials}
    assert df.set_index("trial_id").loc[trials[half - 1].trial_id, "clean_acc"] == 0.75  # ours is later
    # pandas wrote the committed file: large_string text and float64 for an int column with nulls; neither
    # may come back as JSON-quoted text ('"r"') or as 100.0 beside the engine's 100
    assert not df.trial_id.str.startswith('"').any() and set(df.sweep) == {"r"}
    assert set(df["defense.clean_size"].dropna()) == {"100", "one_shot"}
    assert import_rows(here, [src / "trials", src]) == (2 * half, 0)  # again, as a folder: nothing changes
    again = load(here)
    pd.testing.assert_frame_equal(again.sort_values("trial_id").reset_index(drop=True),
                                  df.sort_values("trial_id").reset_index(drop=True))
    assert len(list((here / "trials").glob("*.parquet"))) == 1


def test_import_refuses_what_is_not_trial_rows_and_writes_nothing(tmp_path):
    import pytest
    from click.testing import CliRunner

    from sweep.cli import main

    good = _written(tmp_path, expand(parse_spec(SPEC))[:2])
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"trial_id": ["x"], "clean_acc": [0.5]}).to_parquet(bad)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    for src in (bad, junk):
        r = CliRunner().invoke(main, ["import", str(good / "trials"), str(src), "--results", str(tmp_path / "new")])
        assert r.exit_code == 2 and str(src) in r.output and "nothing imported" in r.output, r.output
        assert not (tmp_path / "new").exists()
    assert "status" in CliRunner().invoke(main, ["import", str(bad), "--results", str(tmp_path / "n")]).output
    with pytest.raises(ValueError, match="no part"):
        from sweep.results import import_rows
        import_rows(tmp_path / "n", [tmp_path])  # a folder with no rows
    r = CliRunner().invoke(main, ["import", str(good / "trials"), "--results", str(tmp_path / "new")])
    assert r.exit_code == 0 and "2 rows read, 2 trials new" in r.output, r.output


def test_a_run_on_a_new_machine_skips_the_imported_trials(tmp_path):
    """The piece's rows committed on one machine, imported into an empty results directory on another: the
    same `sweep run` there runs only what they do not hold."""
    from click.testing import CliRunner

    from sweep.cli import main
    from sweep.runner import run_sweep
    from sweep.spec import narrow
    from sweep.testing import trivial_body

    spec = parse_spec({"name": "newmachine", "dataset": {"name": "synthetic", "train_size": 100, "test_size": 100},
                       "model": "small_cnn", "seeds": [0, 1], "attacks": [{"name": "none"}],
                       "defenses": [{"name": "none"}, {"name": "finetune"}]})
    run_sweep(narrow(spec, seeds=[0]), tmp_path / "old", progress=False, body=trivial_body)
    pd.read_parquet(tmp_path / "old" / "trials").to_parquet(tmp_path / "trials.parquet")
    r = CliRunner().invoke(main, ["import", str(tmp_path / "trials.parquet"), "--results", str(tmp_path / "new")])
    assert r.exit_code == 0, r.output
    s = run_sweep(spec, tmp_path / "new", progress=False, body=trivial_body)
    assert (s.trials, s.skipped, s.ran) == (4, 2, 2)
    df = load(tmp_path / "new")
    assert len(df) == 4 and df.trial_id.is_unique and sorted(df.seed) == [0, 0, 1, 1]


def test_pandas_reads_the_trials_folder_while_a_run_writes_to_it(tmp_path):
    """Every part on disk has one schema from the moment a run starts, so ``pd.read_parquet(DIR/trials)``
    (what docs/results.md offers) works mid-run: pyarrow takes a folder's schema from one part and fails
    on a part whose column has another type (a null column of imported rows, bool now) or drops the
    columns that part lacks (the new run's parameters)."""
    first = expand(parse_spec(SPEC))
    w = ResultsWriter(tmp_path, schema_for(first))
    for r in rows(first):
        w.add(r)
    w.close()
    # rows that went through pandas (a committed trials.parquet, imported): an all-null column is type null
    (part,) = (tmp_path / "trials").glob("part-*.parquet")
    # (named to sort first: pyarrow takes the folder's schema from the first part)
    pd.read_parquet(part).assign(**{"defense.augment": None}).to_parquet(part.with_name("part-0-compact.parquet"))
    part.unlink()
    assert str(pq.read_schema(tmp_path / "trials" / "part-0-compact.parquet").field("defense.augment").type) == "null"
    spec2 = {**SPEC, "seeds": [7], "defenses": [{"name": "ibau", "augment": True, "clean_size": 100}],
             "attacks": [{"name": "badnets"}]}
    second = expand(parse_spec(spec2))
    w = ResultsWriter(tmp_path, schema_for(second, tmp_path), flush_rows=1)
    for r in rows(second):
        w.add(r)  # flushed: two parts on disk, the run not closed
    assert len(list((tmp_path / "trials").glob("part-*.parquet"))) == 2
    df = pd.read_parquet(tmp_path / "trials")
    assert len(df) == len(first) + len(second)
    new = df[df.defense == "ibau"]
    assert new["defense.augment"].tolist() == [True] * len(second)
    assert new["defense.rounds"].notna().all()  # a column only the second run's parts have
    assert len(load(tmp_path)) == len(first) + len(second)
    w.close()


def test_rows_from_before_a_parameter_existed_count_for_its_trials(tmp_path):
    """I-BAU gained ``projected_map`` after trials were recorded; rows from then have ids hashed without it.
    Such a row is the trial at the parameter's legacy value (False): a re-run skips it and writes no second
    row, and validate counts it done; the trial at the new value (True) is another trial and runs."""
    from click.testing import CliRunner

    from sweep.cli import main
    from sweep.runner import run_sweep
    from sweep.spec import content_hash
    from sweep.testing import trivial_body
    from sweep.trial import base_row

    raw = {"name": "legacy", "dataset": {"name": "synthetic", "train_size": 200, "test_size": 100},
           "model": "small_cnn", "seeds": [0], "attacks": [{"name": "badnets", "poison_rate": 0.1}],
           "defenses": [{"name": "ibau", "clean_size": 100, "projected_map": [False, True]}]}
    spec = parse_spec(raw)
    old, new = expand(spec)
    assert (old.defense.params["projected_map"], new.defense.params["projected_map"]) == (False, True)
    before = {k: v for k, v in old.defense.params.items() if k != "projected_map"}  # an older version's id
    legacy_id = content_hash({"model_key": old.model_key, "defense": {"name": "ibau", "params": before}})
    assert legacy_id in old.aliases and legacy_id != old.trial_id and not new.aliases
    w = ResultsWriter(tmp_path / "res", schema_for([old]))
    w.add({**base_row(old), "trial_id": legacy_id, "status": "ok", "clean_acc": 0.7, "asr": 0.1})
    w.close()
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "spec.yaml"), "--results", str(tmp_path / "res")])
    assert "1 ok, 0 failed, 0 stopped; 1 to run" in r.output, r.output
    s = run_sweep(spec, tmp_path / "res", progress=False, body=trivial_body)
    assert (s.trials, s.skipped, s.ran) == (2, 1, 1)
    df = load(tmp_path / "res")
    assert sorted(df.trial_id) == sorted([legacy_id, new.trial_id])
