"""Every value that reaches the job script, with every way out of it.

Table-driven: each rendered field gets newlines, carriage returns, command
substitutions, backticks, `;`, quotes and `#SBATCH` payloads. Each case is
either refused with one line (ConfigError/JobsError) or rendered so that
`bash -n` accepts the script, its #SBATCH block holds exactly the directives
of the clean script, and running it (stub srun / interpreter) creates no
file the payload asked for.
"""
from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest

from grpo_core.config import ConfigError
from jobs import submit
from jobs.profiles import load_profile
from jobs.render import RunSpec, render_sbatch
from jobs.runs import JobsError

PAYLOADS = {
    "newline": "ok\n#SBATCH --wrap=touch {pwn}\ntouch {pwn}",
    "cr": "ok\r\ntouch {pwn}",
    "subst": "$(touch {pwn})",
    "backtick": "`touch {pwn}`",
    "semicolon": "ok; touch {pwn}",
    "quote_break": "ok' ; touch {pwn}; echo '",
    "dquote_break": 'ok" ; touch {pwn}; echo "',
    "and": "ok && touch {pwn} #",
    "sbatch_space": "ok #SBATCH --wrap=touch",
    "tab": "ok\ttouch {pwn}",
    "nul_like": "ok\x0btouch {pwn}",
}
# Overrides that put a payload into one rendered field ({v}: the payload).
FIELDS = {
    "partition": "cluster.partition={v}",
    "account": "cluster.account={v}",
    "qos": "cluster.qos={v}",
    "mem": "cluster.mem={v}",
    "sbatch_value": "cluster.sbatch.constraint={v}",
    "sbatch_key": "cluster.sbatch.{v}=1",
    "env_value": "cluster.env.X={v}",
    "env_key": "cluster.env.{v}=1",
    "python": "cluster.python={v}",
    "workdir": "cluster.workdir={v}",
    "model_path": "train.model.path={v}",
    "experiment": "train.tracking.experiment={v}",
}
CONTROL = ("newline", "cr", "tab", "nul_like")
LAUNCHERS = ("slurm-cpu", "local")


@pytest.mark.parametrize("payload", CONTROL)
def test_setup_lines_are_code_but_one_line_each(payload: str) -> None:
    with pytest.raises(ConfigError, match="control characters"):
        load_profile("slurm-cpu", [f"cluster.setup={PAYLOADS[payload].format(pwn='x')}"])


def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _sbatch_lines(text: str) -> list[str]:
    """The directives sbatch reads: #SBATCH lines before the first command."""
    out = []
    for line in text.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            out.append(line)
        elif line.strip() and not line.startswith("#"):
            break
    return out


def _run_script(text: str, tmp: Path) -> None:
    script = tmp / "job.sh"
    script.write_text(text)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    subprocess.run(["bash", str(script)], cwd=tmp, env={"PATH": f"{tmp / 'bin'}:/usr/bin:/bin"},
                   capture_output=True, timeout=60)


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("field", list(FIELDS))
def test_no_value_breaks_out_of_the_script(field: str, payload: str, launcher: str, tmp_path: Path) -> None:
    if payload in CONTROL:  # never accepted anywhere: a newline would end the line it is rendered on
        with pytest.raises(ConfigError, match="control characters"):
            load_profile(launcher, [FIELDS[field].format(v=PAYLOADS[payload].format(pwn="x"))])
    pwn = tmp_path / "PWNED"
    value = PAYLOADS[payload].format(pwn=pwn)
    (tmp_path / "bin").mkdir()
    (tmp_path / "work").mkdir()
    _stub(tmp_path / "bin" / "srun", "exit 0\n")
    fake_python = _stub(tmp_path / "bin" / "fakepython", "exit 0\n")
    base = [f"cluster.python={fake_python}", f"cluster.workdir={tmp_path / 'work'}"]
    run = RunSpec(name="inj", run_dir=str(tmp_path / "runs" / "inj"), workdir=str(tmp_path / "work"))
    clean = render_sbatch(load_profile(launcher, base), run)
    try:
        profile = load_profile(launcher, base + [FIELDS[field].format(v=value)])
        text = render_sbatch(profile, run)
    except (ConfigError, JobsError) as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message and message.strip(), message
        assert not pwn.exists()
        return
    # Accepted: only as inert data. No directive beyond the clean script's and the field's own.
    directives = _sbatch_lines(text)
    assert sum(line.lstrip().startswith("#SBATCH") for line in text.splitlines()) == len(directives), text
    names = {re.match(r"^#SBATCH --([a-z][a-z0-9-]*)(=\S+)?$", line).group(1) for line in directives}
    allowed = {line.split("=", 1)[0][len("#SBATCH --"):] for line in _sbatch_lines(clean)}
    assert names <= allowed | {"partition", "account", "qos", "mem", "constraint"}, text
    assert "\r" not in text, text
    _run_script(text, tmp_path)
    assert not pwn.exists(), f"{field}={value!r} ran code:\n{text}"


# Every non-control payload in one value: what the whole-script tests below put into every field at once.
HOSTILE = " ; ".join(PAYLOADS[p] for p in PAYLOADS if p not in CONTROL)


def hostile_overrides(launcher: str, pwn: Path, base: list[str] = ()) -> list[str]:
    """Each field's override with the HOSTILE value, for the fields that accept it (the others refuse it
    with one line, tested above)."""
    accepted = []
    for field, override in FIELDS.items():
        if field in ("python", "workdir"):
            continue  # they must exist to run the script; their quoting is tested one by one above
        candidate = override.format(v=HOSTILE.format(pwn=pwn))
        try:
            load_profile(launcher, [*base, candidate])
        except ConfigError:
            continue
        accepted.append(candidate)
    return accepted


@pytest.mark.parametrize("launcher", ("slurm-cpu", "local", "h100x2", "h800x4"))
def test_a_script_with_every_hostile_value_at_once(launcher: str, tmp_path: Path) -> None:
    """All the accepted payloads in all the fields of one script: bash -n passes, the #SBATCH block is
    the clean one's plus the fields' own, and running it creates nothing."""
    pwn = tmp_path / "PWNED"
    (tmp_path / "bin").mkdir()
    (tmp_path / "work").mkdir()
    _stub(tmp_path / "bin" / "srun", "exit 0\n")
    fake_python = _stub(tmp_path / "bin" / "fakepython", "exit 0\n")
    base = [f"cluster.python={fake_python}", f"cluster.workdir={tmp_path / 'work'}"]
    hostile = hostile_overrides(launcher, pwn, base)
    assert {"cluster.env.X", "train.model.path", "train.tracking.experiment"} <= {
        o.split("=", 1)[0] for o in hostile}, hostile  # the test puts payloads somewhere
    run = RunSpec(name="inj", run_dir=str(tmp_path / "runs" / "inj"), workdir=str(tmp_path / "work"))
    clean = _sbatch_lines(render_sbatch(load_profile(launcher, base), run))
    text = render_sbatch(load_profile(launcher, base + hostile), run)
    assert HOSTILE.format(pwn=pwn).replace("'", "'\"'\"'") in text  # the value is there, quoted
    extra = [line for line in _sbatch_lines(text) if line not in clean]
    assert all(line.startswith("#SBATCH --constraint=") for line in extra), extra
    _run_script(text, tmp_path)
    assert not pwn.exists(), text


@pytest.mark.parametrize("payload", ["\n", "\r", "$(touch {pwn})", "`touch {pwn}`", "a b", "x;y"])
def test_runs_dir_with_metacharacters(payload: str, tmp_path: Path) -> None:
    """The run dir is quoted in the local script; sbatch's unquoted #SBATCH --output refuses it."""
    pwn = tmp_path / "PWNED"
    (tmp_path / "bin").mkdir()
    _stub(tmp_path / "bin" / "srun", "exit 0\n")
    fake_python = _stub(tmp_path / "bin" / "fakepython", "exit 0\n")
    run_dir = str(tmp_path / ("r" + payload.format(pwn=pwn)) / "inj")
    for launcher in LAUNCHERS:
        try:
            run = RunSpec(name="inj", run_dir=run_dir, workdir=str(tmp_path))
            text = render_sbatch(load_profile(launcher, [f"cluster.python={fake_python}"]), run)
        except JobsError as exc:
            assert "\n" not in str(exc)
            continue
        assert launcher == "local" or not re.search(r"[\s;`$]", payload), text
        _run_script(text, tmp_path)
        assert not pwn.exists(), text


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "", ".", "..", ".hidden", "-x", "a\nb", "a b",
                                  "$(touch PWNED)", "x" * 129])
def test_run_names_that_leave_the_runs_folder(name: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        submit.main(["--profile", "local", f"--name={name}", "--runs-dir", str(tmp_path / "runs"), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: run name"), err
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob("PWNED"))
    assert not (tmp_path / "x").exists() and not Path("/abs").exists()
