"""Every fenced code block of README.md and docs/*.md runs as written, unless the words after its language say
why not (docs/testing.md); the API example prints what its comments say; the pages say what the tests need."""

import contextlib
import io
import os
import re
import shlex

import jax
import numpy as np
import pytest
from launcher_cli import cli

from jaxdissect import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))
NOT_RUN = {"needs-files", "fragment", "install", "server"}   # why a block is not run (docs/testing.md)
TAGS = NOT_RUN | {"slow"}
FENCE = re.compile(r"^```(\S*)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def _text(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def _blocks():
    """(page, line, language, tags, code, section) of every fenced block; section: the heading above it."""
    found = []
    for page in PAGES:
        text = _text(page)
        for m in FENCE.finditer(text):
            headings = re.findall(r"^#+ (.*)$", text[:m.start()], re.M)
            found.append((page, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2).split(), m.group(3),
                          headings[-1] if headings else ""))
    return found


BLOCKS = _blocks()
RUN = [pytest.param(b, id=f"{b[0]}:{b[1]}", marks=[pytest.mark.slow] if "slow" in b[3] else [])
       for b in BLOCKS if b[2] != "text" and not NOT_RUN & set(b[3])]   # text: a drawing or an output


def _commands(code):
    """The shell block's commands (continuation lines joined, comments dropped); each must be ``python -m``."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            words = shlex.split(line)
            assert words[:2] == ["python", "-m"] and len(words) > 2, \
                f"{line!r}: a shell block that runs holds only 'python -m MODULE ...' lines; tag it otherwise"
            commands.append(words[2:])
    return commands


def _check_functional_api(namespace, lines):
    """docs/api.md's first example prints what its comments say."""
    assert lines[0] == "['conv1', 'block2.Conv_0', 'block2', 'Dense_0']"
    assert lines[1].startswith("{'unit': 0, 'label': 'sky', 'category': '-', 'iou': ")
    assert lines[1].endswith("'interpretable': True}")
    assert lines[2] == "(6,) (6, 3)"
    assert namespace["acts"]["block2"].shape == (4, 16, 16, 16)
    assert float(namespace["acts"]["block2"].min()) >= 0.0          # post-ReLU, as the page says
    assert float(namespace["acts"]["conv1"].min()) < 0.0            # pre-ReLU


def _check_sparse_codes(namespace, lines):
    """The sparse codes' levels are numpy.quantile of their dense map (made here by NumPy), upsampled."""
    idx, val = namespace["idx"], namespace["val"]
    dense = np.zeros(idx.shape[:-1] + (6,), np.float32)
    np.put_along_axis(dense, idx, val, -1)
    plan = statistics.Plan(num_units=6, num_labels=3, source_hw=(8, 8), resolution=(16, 16))
    up = np.asarray(jax.jit(plan.upsample)(dense)).reshape(-1, 6)
    levels = np.quantile(up, 0.95, axis=0).astype(np.float32)
    assert namespace["sparse"].thresholds.tobytes() == levels.tobytes()
    np.testing.assert_array_equal(namespace["sparse"].active, (up > levels).sum(0))


CHECKS = {("docs/api.md", "A model of your own, your own activations"): _check_functional_api,
          ("docs/api.md", "Sparse codes"): _check_sparse_codes}


@pytest.mark.parametrize("block", RUN)
def test_code_block_runs_as_written(block, demo_cache, tmp_path, monkeypatch):
    """In an empty folder (holding a link to configs/, which the commands name relative to the repository);
    shell commands run in process on the small demo model."""
    page, line, language, tags, code, section = block
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    if language == "python":
        out = io.StringIO()
        namespace: dict = {"__name__": "docs"}
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
        check = CHECKS.get((page, section))
        if check:
            check(namespace, out.getvalue().splitlines())
    else:
        assert language in ("bash", "sh"), f"{page}:{line}: a block of language {language!r} runs; tag it"
        monkeypatch.setenv("JAXDISSECT_CACHE", demo_cache)
        for command in _commands(code):
            code_, out, err = cli(*command)
            assert code_ == 0, (page, line, command, err[-3000:])
            assert "Traceback" not in out + err


def test_every_block_runs_or_says_why():
    """Tags are known ones; every check names a block that runs; every docs page is linked from the README."""
    for page, line, language, tags, code, section in BLOCKS:
        assert language, f"{page}:{line}: give the block a language (python, bash)"
        assert set(tags) <= TAGS, (page, line, tags)
    running = {(b.values[0][0], b.values[0][5]) for b in RUN}
    assert set(CHECKS) <= running, set(CHECKS) - running
    readme = _text("README.md")
    for page in PAGES[1:]:
        assert f"]({page})" in readme, f"README.md does not link {page}"


def test_readme_cites_no_missing_spec_and_says_what_the_tests_and_app_need():
    """Issue 23 item 5: no section numbers of a spec that is not in the repository; the browser test's
    Debian packages are named; the toy app's default strength is the one it uses."""
    text = "\n".join(_text(page) for page in PAGES)
    readme = _text("README.md")
    assert not re.search(r"spec[ .]*\d|spec\.md|\(\d+\.\d+\) \|", text), re.findall(r".{30}spec.{20}", text)
    assert "chromium-driver" in readme and "tests/test_app_browser.py" in readme
    assert "default high for a converted generator, low for the toy" in " ".join(text.split())
