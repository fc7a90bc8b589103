"""The README's functional-API example runs exactly as written, and prints what its comments say."""

import contextlib
import io
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _functional_api_block() -> str:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Functional API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_functional_api_example_runs_as_written():
    code = _functional_api_block()
    out = io.StringIO()
    namespace: dict = {"__name__": "readme"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, README, "exec"), namespace)
    lines = out.getvalue().splitlines()
    assert lines[0] == "['conv1', 'block2.Conv_0', 'block2', 'Dense_0']"
    assert lines[1].startswith("{'unit': 0, 'label': 'sky', 'category': '-', 'iou': ")
    assert lines[1].endswith("'interpretable': True}")
    assert lines[2] == "(6,) (6, 3)"
    assert namespace["acts"]["block2"].shape == (4, 16, 16, 16)
    assert float(namespace["acts"]["block2"].min()) >= 0.0          # post-ReLU, as the README says
    assert float(namespace["acts"]["conv1"].min()) < 0.0            # pre-ReLU


def test_readme_cites_no_missing_spec_and_says_what_the_tests_and_app_need():
    """Issue 23 item 5: no section numbers of a spec that is not in the repository; the browser test's
    Debian packages are named; the toy app's default strength is the one it uses."""
    text = open(README, encoding="utf-8").read()
    assert not re.search(r"spec[ .]*\d|spec\.md|\(\d+\.\d+\) \|", text), re.findall(r".{30}spec.{20}", text)
    assert "chromium-driver" in text and "tests/test_app_browser.py" in text
    assert "default high for a converted generator, low for the toy" in " ".join(text.split())
