"""The shipped prompt set: sizes, no duplicates, train and eval disjoint, and the files are the generator's output."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prompt_files_are_distinct_disjoint_and_regenerate_exactly():
    train, evals = ((ROOT / "prompts" / f).read_text(encoding="utf-8").splitlines() for f in ("train.txt", "eval.txt"))
    assert len(train) == 3000 and len(evals) == 300
    assert all(p.strip() == p and p for p in train + evals)
    low_t, low_e = {p.lower() for p in train}, {p.lower() for p in evals}
    assert len(low_t) == len(train) and len(low_e) == len(evals)          # no duplicates, even up to case
    assert not low_t & low_e                                               # disjoint
    assert max(len(p.split()) for p in train + evals) <= 30                # well inside CLIP's 77 tokens
    spec = importlib.util.spec_from_file_location("make_prompts", ROOT / "prompts" / "make_prompts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.make() == (train, evals)                                    # committed files == seeded generator
