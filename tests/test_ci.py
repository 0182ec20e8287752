"""CI runs what the README says, and the GitHub Actions workflow runs CI."""

from __future__ import annotations

import re
import subprocess

import yaml

from conftest import ROOT, tool

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def _readme_block_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(marker)
    return re.search(r"```bash\n(.*?)\n```", text[start:], re.S).group(1).strip()


def test_ci_script_runs_the_readme_install_and_test_commands():
    readme = _readme_block_after("Run the tests")
    install, test = (part.strip() for part in readme.split("&&"))
    script = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#") and not line.startswith(("set ", "cd "))]
    assert install.replace("pip install", "python3 -m pip install") == script[0]
    assert test == script[1] and len(script) == 2


def test_workflow_runs_ci_on_pushes_and_pull_requests():
    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on:` key as True
    assert "push" in triggers and "pull_request" in triggers
    steps = [s for job in flow["jobs"].values() for s in job["steps"]]
    assert any(s.get("run", "").strip() == "bash .ci/run" for s in steps)
    python = next(s["with"]["python-version"] for s in steps if "setup-python" in s.get("uses", ""))
    assert tuple(int(x) for x in str(python).split(".")) >= (3, 10), "the README promises Python >= 3.10"


def test_workflow_passes_actionlint():
    out = subprocess.run([tool("actionlint"), str(WORKFLOW)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_badges_and_links_name_one_repository():
    """Every Colab, Kaggle and GitHub link is built from the same <owner>/<repo>, replaced in one go."""
    text = (ROOT / "README.md").read_text()
    slugs = set(re.findall(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob", text))
    slugs |= set(re.findall(r"src=https://github\.com/([^/]+/[^/]+)/blob", text))
    slugs |= set(re.findall(r"https://github\.com/([^/]+/[^/]+)/actions", text))
    assert len(slugs) == 1, f"the README's links name several repositories: {sorted(slugs)}"
    slug = slugs.pop()
    for n in range(1, 6):
        assert f"colab.research.google.com/github/{slug}/blob/main/homework_{n}.ipynb" in text
