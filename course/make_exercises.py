"""The course kit: a student copy of the project with the key functions of ddpo.py cut out.

ddpo.py marks each exercise's region with two comment lines, `# exercise N: begin` and `# exercise N: end`. The
student copy replaces every region by `raise NotImplementedError("exercise N: …")`, naming what to write and
where the paper says it. The copy runs (`python ddpo.py --help`, `import ddpo`), and its tests are
test_exercises.py only: one group per exercise, `pytest -k exercise_N`, checked against numbers, properties
and library references, never against the formula written out. The project's own tests (which spell out the
reference answers), the mutation check and the solutions part of EXERCISES.md are left out.

    python course/make_exercises.py OUT_DIR   # write the student copy (OUT_DIR must not exist)
    python course/make_exercises.py --check   # CI: in a copy, every exercise's tests fail with its own message;
                                              # with the reference bodies put back, they all pass

The copy has the project's layout, with the course kit (EXERCISES.md, test_exercises.py) at its top.
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

COURSE = Path(__file__).resolve().parent
ROOT = COURSE.parent  # the repository
EXERCISES = {  # N: what to write, where to read
    1: "the DDIM step's σ_t and mean μ, paper §3.1 and DDIM (Song et al. 2021) eq. (12) and (16)",
    2: "the policy's log-probability log π(x_{t-1} | x_t, c), averaged over dimensions, paper §3.1 eq. (2) and §4.3",
    3: "per-prompt advantages (the per-prompt stat tracker), paper App. D.3",
    4: "DDPO_SF, the score-function (REINFORCE) loss, paper §4.3",
    5: "DDPO_IS with PPO's clipped ratio, approx_kl and clipfrac, paper §4.3 and App. D.1",
    6: "RWR's exponential and sparse weights, paper §4.2",
    7: "DPOK's KL between two Gaussians with the same σ_t, Fan et al. 2023 §4",
    8: "Flow-GRPO's SDE step on a flow model: σ_t, the step's mean and its std, Liu et al. 2025",
}
SHIPPED = {ROOT / name: name for name in  # source: its path in the copy
           ["ddpo.py", "rewards.py", "plumbing", "world", "evaluate.py", "export.py", "compare.py", "bench.py",
            "requirements.txt", "README.md", "prompts", "configs", "docs"]}
SHIPPED.update({COURSE / "EXERCISES.md": "EXERCISES.md", COURSE / "test_exercises.py": "test_exercises.py"})
REGION = re.compile(r"^( *)# exercise (\d+): begin\n.*?^ *# exercise \2: end\n", re.M | re.S)


def cut(source):
    """ddpo.py's text with every exercise region replaced by a NotImplementedError naming it."""
    def stub(match):
        indent, n = match.group(1), int(match.group(2))
        return f'{indent}raise NotImplementedError("exercise {n}: {EXERCISES[n]}")\n'
    student, count = REGION.subn(stub, source)
    found = sorted({int(n) for n in re.findall(r"# exercise (\d+): begin", source)})
    if found != sorted(EXERCISES) or "# exercise" in student:
        sys.exit(f"error: ddpo.py's exercise markers ({found}) do not match EXERCISES ({sorted(EXERCISES)}) "
                 f"or a begin has no end")
    return student


def make(out):
    out = Path(out)
    if out.exists():
        sys.exit(f"error: {out} exists; give a new folder")
    out.mkdir(parents=True)
    for src, name in SHIPPED.items():
        if src.is_dir():
            shutil.copytree(src, out / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, out / name)
    (out / "ddpo.py").write_text(cut((ROOT / "ddpo.py").read_text()))
    sheet = (out / "EXERCISES.md").read_text()
    (out / "EXERCISES.md").write_text(sheet.split("\n## Solutions")[0].rstrip() + "\n")
    return out


def graded(folder):
    """{test name: failure message or None} of test_exercises.py run in folder."""
    report = folder / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_exercises.py",
                    f"--junitxml={report}"], cwd=folder, capture_output=True, text=True, timeout=600)
    results = {}
    for case in ET.parse(report).iter("testcase"):
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        results[case.get("name")] = None if failure is None else (failure.get("message") or "") + (failure.text or "")
    return results


def check():
    """The student copy fails every exercise's tests with that exercise's own message, runs --help, and passes
    them all once the reference ddpo.py is put back."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = make(Path(tmp) / "student")
        for command in (["ddpo.py", "--help"], ["-c", "import ddpo"]):
            done = subprocess.run([sys.executable, *command], cwd=copy, capture_output=True, text=True)
            if done.returncode:
                problems.append(f"the student copy cannot run {' '.join(command)}: {done.stderr.strip()[-300:]}")
        student = graded(copy)
        for n in EXERCISES:
            mine = {name: why for name, why in student.items() if name.startswith(f"test_exercise_{n}_")}
            if not mine:
                problems.append(f"exercise {n} has no tests")
            for name, why in mine.items():
                if why is None or f"exercise {n}:" not in why:
                    problems.append(f"{name} does not fail with exercise {n}'s message in the student copy")
        shutil.copy2(ROOT / "ddpo.py", copy / "ddpo.py")  # the reference bodies back in
        for name, why in graded(copy).items():
            if why is not None:
                problems.append(f"{name} fails with the reference ddpo.py: {why.splitlines()[0] if why else ''}")
        print(f"student copy: {len(student)} graded tests over {len(EXERCISES)} exercises")
    for problem in problems:
        print("PROBLEM:", problem)
    if problems:
        sys.exit(1)
    print("every exercise fails with its own message in the student copy, and passes with the reference")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="the folder to write the student copy to (new)")
    p.add_argument("--check", action="store_true", help="build a copy in a temporary folder and check it (CI)")
    a = p.parse_args()
    if a.check:
        check()
    elif a.out:
        print(f"wrote {make(a.out)}: start with EXERCISES.md; grade with python -m pytest -q test_exercises.py")
    else:
        p.error("give OUT_DIR or --check")
