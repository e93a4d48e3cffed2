"""The benchmarks' summary of py-spy's collapsed stacks (benchmarks/profiling.py)."""

from __future__ import annotations

from benchmarks.profiling import top_functions

# py-spy record --threads --format raw: "thread (id);outer (file:line);...;inner count"
COLLAPSED = """\
thread (101);run (runner.py:10);reconcile (reconcile.py:40);render (render.py:7) 60
thread (101);run (runner.py:10);reconcile (reconcile.py:41);apply (kube.py:90) 30
thread (202);loop (events.py:5);loop (events.py:9) 10
not a sample line
"""


def test_functions_are_ranked_by_their_share_of_all_samples():
    text = top_functions(COLLAPSED)
    assert text.startswith("# 100 samples")
    inclusive, own = text.split("# self (innermost frame):")
    # the line number is dropped: reconcile's two lines are one function, on 90 samples
    assert "  90.0 %  reconcile (reconcile.py)" in inclusive
    assert "  90.0 %  run (runner.py)" in inclusive
    assert "thread" not in text
    # a recursive frame counts once per sample
    assert "  10.0 %  loop (events.py)" in inclusive
    assert own.splitlines()[1] == "  60.0 %  render (render.py)"
    assert "  30.0 %  apply (kube.py)" in own


def test_no_samples_says_so():
    assert top_functions("") == "# no samples"
