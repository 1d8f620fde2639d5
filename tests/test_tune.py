"""aot/tune.py on the CPU: with the GPU timing replaced by a made-up score, each --table rewrites
only its own rules (and sm_80's copy of sm_90's expand rules), keeps every other rule, and writes a
table that aot/variants.py loads. The timing itself runs on a GPU only (benchmarks/NOTES.md)."""
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tune():
    spec = importlib.util.spec_from_file_location("sgmv_tune_for_test", ROOT / "aot" / "tune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_torch():
    cuda = types.SimpleNamespace(get_device_capability=lambda: (9, 0), get_device_name=lambda: "fake",
                                 get_device_properties=lambda i: types.SimpleNamespace(L2_cache_size=1 << 20))
    return types.SimpleNamespace(cuda=cuda)


@pytest.mark.parametrize("which", ["grouped_rules", "rules", "shrink_rules"])
def test_tune_rewrites_only_its_rules(which, tmp_path, monkeypatch):
    tune = _tune()
    calls = []

    def measure(torch, shapes, candidates, op, with_plan, l2):
        calls.append((op, with_plan, len(shapes)))
        # Made up: the last candidate that fits the first shape's rank wins.
        fit = [t for t in candidates if tune.fits(t, shapes[0][2], op)]
        return {t: 10.0 + i for i, t in enumerate(reversed(fit))}

    monkeypatch.setattr(tune, "measure", measure)
    monkeypatch.setitem(sys.modules, "torch", _fake_torch())
    out = tmp_path / "tiles.json"
    monkeypatch.setattr(sys, "argv", ["tune.py", "--table", which, "--out", str(out)])
    tune.main()
    before = json.loads((ROOT / "aot" / "tiles.json").read_text())
    after = json.loads(out.read_text())
    op = "shrink" if which == "shrink_rules" else "expand"
    assert calls and all(c[0] == op and c[1] == (which == "grouped_rules") for c in calls)
    for key in before:
        if key.endswith("rules") and key != which:
            assert after[key] == before[key], key
    classes = {"grouped_rules": tune.CLASSES, "rules": tune.PREFILL_CLASSES, "shrink_rules": tune.SHRINK_CLASSES}[which]
    changed = after[which]["90"]
    for cls in classes:
        shapes = cls[-1]
        fit = [t for t in {"grouped_rules": tune.CANDIDATES, "rules": tune.PREFILL_CANDIDATES,
                           "shrink_rules": tune.SHRINK_CANDIDATES}[which] if tune.fits(t, shapes[0][2], op)]
        want = fit[-1]
        caps = tuple(cls[:2]) if which == "grouped_rules" else cls[0]
        rule = next(r for r in changed if tuple(r[:2]) == caps)
        got = tuple(after["tiles"][rule[2]])
        if op == "shrink":
            want = (want[0], caps[1] or 64, *want[2:])
        assert got == want, (caps, got, want)
    assert after[which]["80"] == (before[which]["80"] if which == "shrink_rules" else changed)
    for key in ("100", "120"):
        assert after[which][key] == before[which][key]
    used = {r[2] for k in after if k.endswith("rules") for rs in after[k].values() for r in rs}
    assert used | {"unaligned"} == set(after["tiles"])
    # aot/variants.py reads the written table.
    spec = importlib.util.spec_from_file_location("sgmv_variants_for_test", ROOT / "aot" / "variants.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: out.open().read() if self.name == "tiles.json"
                        else Path.open(self).read())
    spec.loader.exec_module(mod)
    assert set(mod.TILES) == set(after["tiles"])
