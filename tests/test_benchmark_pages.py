"""The benchmark pages and the harness (benchmarks/report.py, report_*.py, harness.py): BENCHMARKS.md is a short index
whose every JSON and page exists, `python benchmarks/report.py` renders the committed pages exactly and the same twice,
renderers never import report.py or a script back, no sys.path.insert in benchmarks/, and the harness's machine record,
budgeted parts, evaluation and result writer do what they say."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import harness
import pytest
import report

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"


def test_the_index_is_short_and_links_only_what_exists():
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert len(text.splitlines()) <= 150
    pages = re.findall(r"\]\((benchmarks/results/\w+\.md)\)", text)
    assert sorted(pages) == sorted(t.page.relative_to(ROOT).as_posix() for t in report.TOPICS.values())
    assert all((ROOT / p).exists() for p in pages)
    quoted = re.findall(r"`([\w/]+\.json)`", text)
    assert len(quoted) >= len(report.TOPICS)  # every topic quotes at least one result
    missing = [name for name in quoted if not (RESULTS / name).exists()]
    assert not missing, f"the index quotes results that are not there: {missing}"
    # the results other issues check stay where they were
    for name in ("scaleout.json", "gpu_check.json", "kill_resume.json", "critic_ceiling.json", "fault_injection.json",
                 "engine_equivalence_after.json"):
        assert (RESULTS / name).exists() and name in text


def _copy_of_the_benchmarks(tmp_path: Path) -> Path:
    """benchmarks/'s code and NOTES.md in a scratch checkout, its results/ linking to the committed results (but not
    the rendered pages): report.py there writes its pages into the scratch tree only."""
    bench = tmp_path / "benchmarks"
    (bench / "results").mkdir(parents=True)
    for f in BENCH.glob("*.py"):
        shutil.copy2(f, bench / f.name)
    shutil.copy2(BENCH / "NOTES.md", bench / "NOTES.md")
    for f in RESULTS.iterdir():
        if f.suffix != ".md":
            (bench / "results" / f.name).symlink_to(f)
    return bench


def _render(bench: Path) -> dict[str, str]:
    subprocess.run([sys.executable, str(bench / "report.py")], cwd=bench.parent, check=True, capture_output=True)
    out = {"BENCHMARKS.md": (bench.parent / "BENCHMARKS.md").read_text()}
    out.update({p.name: p.read_text() for p in sorted((bench / "results").glob("*.md"))})
    return out


def test_report_renders_the_committed_pages_and_the_same_twice(tmp_path):
    bench = _copy_of_the_benchmarks(tmp_path)
    first, second = _render(bench), _render(bench)
    assert first == second
    committed = {"BENCHMARKS.md": (ROOT / "BENCHMARKS.md").read_text()}
    committed.update({p.name: p.read_text() for p in sorted(RESULTS.glob("*.md"))})
    assert first.keys() == committed.keys() == {"BENCHMARKS.md", *(f"{t}.md" for t in report.TOPICS)}
    stale = [name for name in first if first[name] != committed[name]]
    assert not stale, f"{stale} differ from a fresh render: run `python benchmarks/report.py` and commit the pages"


def test_every_page_link_resolves_beside_the_page():
    for topic in report.TOPICS.values():
        text = topic.page.read_text()
        assert text.startswith(f"# {topic.title}\n")
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            assert (topic.page.parent / target).exists(), f"{topic.page.name} links to {target}, which is not there"


def test_the_write_writes_json_with_schema_version_and_rerenders_its_topic(tmp_path):
    bench = _copy_of_the_benchmarks(tmp_path)
    _render(bench)
    kill = json.loads((RESULTS / "kill_resume.json").read_text())
    kill["verdict"] = "7/7 identical"
    (bench / "results" / "kill_resume.json").unlink()  # the link to the committed file: write a real one instead
    code = ("import json, harness; d = json.loads(open('in.json').read()); "
            "harness.write_result('results/kill_resume.json', d, topic='reliability')")
    (bench / "in.json").write_text(json.dumps(kill))
    subprocess.run([sys.executable, "-c", code], cwd=bench, check=True, capture_output=True)
    written = json.loads((bench / "results" / "kill_resume.json").read_text())
    assert next(iter(written)) == "schema_version" and written["schema_version"] == harness.SCHEMA_VERSION
    assert {k: v for k, v in written.items() if k != "schema_version"} == kill
    assert "**Result: 7/7 identical**" in (bench / "results" / "reliability.md").read_text()
    assert "1: 7/7 identical" in (bench.parent / "BENCHMARKS.md").read_text()
    assert "7/7" not in (bench / "results" / "critic.md").read_text()


def test_write_result_without_a_topic_only_writes(tmp_path):
    out = tmp_path / "sub" / "r.json"
    record = harness.write_result(out, {"schema_version": 0, "a": 1.5, "b": [1, 2]}, indent=1)
    assert record == {"schema_version": harness.SCHEMA_VERSION, "a": 1.5, "b": [1, 2]}
    assert json.loads(out.read_text()) == record and out.read_text().startswith('{\n "schema_version": 1,')
    with pytest.raises(ValueError, match="unknown benchmark topic 'gpu'.*critic, training"):
        report.write_topic("gpu")


def test_no_sys_path_insert_in_benchmarks():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in BENCH.rglob("*.py") if "results" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if "sys.path.insert" in line]
    assert not hits


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_renderers_import_neither_report_nor_a_script():
    """report.py imports the renderers (report_*.py); a renderer imports only other renderers, so no import circle
    runs through report.py and rendering needs no benchmark script (nor torch)."""
    scripts = {p.stem for p in BENCH.glob("*.py")}
    renderers = {s for s in scripts if s.startswith("report_")}
    for name in sorted(renderers):
        sibling = _imports(BENCH / f"{name}.py") & scripts
        assert sibling <= renderers, f"{name}.py imports {sibling - renderers}"
    assert _imports(BENCH / "report.py") & scripts <= renderers
    # harness imports report only inside write_result, at call time
    top = {n.module for n in ast.parse((BENCH / "harness.py").read_text()).body if isinstance(n, ast.ImportFrom)}
    assert "report" not in top and "report" in _imports(BENCH / "harness.py")


def test_every_notes_part_has_a_topic_and_an_unknown_one_is_refused(tmp_path):
    parts = report.notes_by_topic()
    assert set(parts) <= set(report.TOPICS)
    n_headings = len(re.findall(r"(?m)^## ", (BENCH / "NOTES.md").read_text()))
    assert sum(len(re.findall(r"(?m)^## ", p)) for p in parts.values()) == n_headings
    notes = tmp_path / "NOTES.md"
    notes.write_text("## Reading the baselines\n\ntext\n\n## Reading the moon\n\nmore\n")
    with pytest.raises(ValueError, match="'Reading the moon' belongs to no topic; add it to NOTES_TOPIC"):
        report.notes_by_topic(notes)


def test_machine_info_records_the_machine_and_the_scripts_fields():
    import os
    import platform

    import torch

    m = harness.machine_info(torch_threads=3, note="pinned", cores_used=1)
    assert m == {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "torch": torch.__version__, "torch_threads": 3, "note": "pinned", "cores_used": 1}
    assert harness.machine_info()["torch_threads"] == torch.get_num_threads()
    with pytest.raises(ValueError, match=r"\['cpu_count'\] are recorded by machine_info itself"):
        harness.machine_info(cpu_count=2)


def test_run_parts_skips_what_the_budget_cannot_fit_and_records_errors():
    budget = harness.Budget.starting_now(100.0)
    assert 99.0 < budget.left() <= 100.0 and not budget.expired() and budget.expired(margin_s=101.0)
    seen, ran = [], []

    def run_part(part, left):
        ran.append(part)
        if part == "b":
            raise RuntimeError("part b broke")
        return {"value": part * 2, "left_at_start": left}

    done = harness.run_parts(["a", "b", "c", "d"], budget, run_part, min_seconds={"c": 1000.0},
                             on_done=lambda part, res: seen.append(part))
    assert ran == ["a", "b", "d"] and seen == ["a", "b", "c", "d"] and list(done) == ["a", "b", "c", "d"]
    assert done["a"]["value"] == "aa" and 0 < done["a"]["left_at_start"] <= 100.0 and done["a"]["part_s"] >= 0
    assert done["b"]["error"] == "RuntimeError: part b broke" and "Traceback" in done["b"]["traceback"]
    assert re.fullmatch(r"\d+ s of the 100 s budget left", done["c"]["skipped"]) and "part_s" not in done["c"]
    expired = harness.Budget(deadline=time.time() - 1.0, seconds=5.0)
    assert harness.run_parts(["x"], expired, run_part, min_seconds={"x": 0.5})["x"]["skipped"].endswith("5 s budget left")
    with pytest.raises(ValueError, match="must be positive seconds"):
        harness.Budget.starting_now(0)


def test_evaluate_gives_the_numbers_of_the_helpers_it_replaced(tmp_path):
    """digits_advantages.evaluate_policy (now on harness.evaluate) against the code it replaced, on a real digits
    trainer: the same samples, the same reward means, the same diversity."""
    import torch
    from digits_advantages import evaluate_policy

    from critic_align.api import build_trainer
    from critic_align.diagnostics import within_prompt_diversity
    from critic_align.train.registry import load_run_config

    trainer = build_trainer(load_run_config("digits", {"output_dir": str(tmp_path), "num_inference_steps": 4,
                                                       "progress": False, "log_tensorboard": False}))
    with torch.no_grad():  # the replaced helper, verbatim
        prompts = [p for p in trainer.task.prompts for _ in range(2)]
        samples = trainer.sample(prompts, seed=5)
        old = {f"diversity_{k}": v for k, v in within_prompt_diversity(samples, prompts).items()}
        for k, name in enumerate(trainer.rewards.names):
            old[name] = trainer.rewards(samples, prompts)[:, k].mean().item()
        if trainer.eval_rewards is not None:
            for k, name in enumerate(trainer.eval_rewards.names):
                old[name] = trainer.eval_rewards(samples, prompts)[:, k].mean().item()
    new = evaluate_policy(trainer, per_class=2, seed=5)
    assert new == old and list(new) == list(old) and "digit_prob" in new
    ev = harness.evaluate(trainer, prompts, [None, trainer.rewards], seed=5, use_policy=False)
    base = trainer.rewards(trainer.sample(prompts, seed=5, use_policy=False), prompts)
    assert ev.means == {n: base[:, k].mean().item() for k, n in enumerate(trainer.rewards.names)}
    assert harness.per_prompt(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]


def test_tensor_cache_round_trips_without_pickle(tmp_path):
    import torch

    data = {"latents": torch.arange(12.0).view(2, 3, 2)[:, ::2], "R": torch.tensor([[0.5], [0.25]]),
            "prompts": ["a cat", "a dog"], "oracle_counts": {"queries": 8, "nfe": 40}, "K": 2, "oracle_seconds": 1.5}
    path = tmp_path / "held.safetensors"
    harness.save_tensor_cache(path, data)
    back = harness.load_tensor_cache(path)
    assert sorted(back) == sorted(data)
    assert torch.equal(back["latents"], data["latents"]) and torch.equal(back["R"], data["R"])
    assert (back["prompts"], back["oracle_counts"], back["K"], back["oracle_seconds"]) == (
        ["a cat", "a dog"], {"queries": 8, "nfe": 40}, 2, 1.5)
    assert not list(tmp_path.glob("*.partial"))
    torch.save(data, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="pickled .pt caches are not read"):
        harness.load_tensor_cache(tmp_path / "old.pt")
