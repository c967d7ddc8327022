"""No run's output is ever lost or mixed: outputs are written all or nothing, whatever the disk, the name or
the signal (issue 23, part 1).

Each documented case (``OUTPUT_CASES``, rows of ``docs/bad-input.md``) runs through the command line and must
end with exit code 2, one line, and every file as it was; the successful cases check that the output really
lands where a user expects it. Full and read-only disks are real: a tmpfs mounted for the test (root only;
elsewhere those tests say why they skip, and the fault-injection tests below cover the same code paths); so
are mount points (bind mounts), other users' files in sticky directories (root with its capabilities dropped
by ``setpriv``) and a rename the kernel refuses in the middle of a commit.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import test_bad_input
import torch
from safetensors.torch import save
from test_bad_input import scores_file, snapshot

from headscore.cli import main
from headscore.errors import HeadscoreError
from headscore.output_files import TEMP_PREFIX, OutputSet, OutputWriteError, atomic_write
from headscore.report import REPORT_FILES, write_report
from headscore.results import HeadScores

ROOT = Path(__file__).resolve().parents[1]

# case id -> words of the one line the user sees (docs/bad-input.md shows the same words)
OUTPUT_CASES = {
    "out-name-too-long": "File name too long",
    "out-symlink-loop": "Too many levels of symbolic links (a symbolic link loop)",
    "report-symlink-loop": "Too many levels of symbolic links (a symbolic link loop)",
    "out-trailing-slash": "ends with '/', which names a directory; give a file name",
    "report-dir-holds-other-files": "holds other files (notes.txt); the output replaces its directory as a whole",
    "out-disk-full": "No space left on device; nothing was written",
    "export-disk-full": "No space left on device; nothing was written",
    "report-disk-full": "No space left on device; nothing was written",
    "circuit-disk-full": "No space left on device; nothing was written",
    "out-read-only": "cannot write in",
    "out-mount-point": "is a mount point, and the write renames a new file into its place, which a mount point refuses",
    "report-mount-point": "is a mount point, and the write renames a new directory into its place",
    "out-sticky-other-user": "belongs to another user in the sticky directory",
    "report-out-cwd": "is the current directory or holds it; the output replaces its directory whole",
    "scores-checksum": "checksum mismatch: the file was changed or damaged after it was written",
    "scores-is-directory": "is a directory, not a scores file",
    "scores-negative-counts": "counts must not be negative, got -3",
    "scores-deep-metadata": "metadata 'extra' is JSON nested too deep",
    "scores-lone-surrogate": "metadata 'tasks' holds a lone surrogate",
    "top-k-negative": "top_k needs k >= 1 (a whole number), got -1",
}


model_dir = test_bad_input.model_dir  # the same fixtures: a tiny saved model, a two-task file
tasks = test_bad_input.tasks


def refused(capsys, case: str, argv: list, *roots: Path) -> str:
    """Run the command; assert exit 2, one line naming the problem, no file changed or added, no temporary."""
    before = snapshot(*roots)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (case, err)
    assert err.startswith("headscore: error: ") and err.count("\n") == 1, err
    assert OUTPUT_CASES[case] in err, err
    assert snapshot(*roots) == before, "a file changed or appeared"
    return err


def leftovers(*dirs: Path) -> list[Path]:
    """Temporaries of headscore's writes left in ``dirs`` (there must be none)."""
    return [p for d in dirs if d.is_dir() for p in d.iterdir() if p.name.startswith(TEMP_PREFIX)]


def score_args(model_dir: Path, tasks: Path, *extra) -> list[str]:
    return ["score", "--model", str(model_dir), "--tasks", str(tasks), "--no-progress", *map(str, extra)]


# --------------------------------------------------------------------------------------- a tmpfs of our own


def _mount(where: Path, size: str, *options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@contextmanager
def tmpfs(where: Path, size: str = "64k"):
    """A fresh tmpfs of ``size`` at ``where`` (skips the test where mounting is not allowed: not root)."""
    if os.geteuid() != 0 or not _mount(where, size):
        pytest.skip("mounting a small tmpfs needs root (CI runs as root); the fault-injection tests cover this")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextmanager
def bind_mount(source: Path, where: Path):
    """``source`` bind-mounted at ``where`` (a file on a file, a directory on a directory), as ``docker -v`` does;
    skips the test where mounting is not allowed (not root)."""
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(source), str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a bind mount needs root (CI runs as root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until at most ``leave`` bytes are free."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as fh:
        try:
            fh.write(b"\0" * max(0, free - leave))
            fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


# ------------------------------------------------------------------------------------------- names, links


def test_a_legal_250_byte_name_is_written(tmp_path, capsys, model_dir, tasks):
    """Case 1: the temporary's name used to be ``.<name>.XXXXXXXX`` (over 255 bytes): now it is short."""
    long_name = "s" * 247 + ".hs"
    assert main(score_args(model_dir, tasks, "--out", tmp_path / long_name, "--export",
                           tmp_path / ("e" * 246 + ".csv"))) == 0
    assert HeadScores.load(tmp_path / long_name).tasks == ["geo", "other"]
    assert (tmp_path / ("e" * 246 + ".csv")).read_text().startswith("task,layer,head")
    assert not leftovers(tmp_path)
    capsys.readouterr()
    refused(capsys, "out-name-too-long", score_args(model_dir, tasks, "--out", tmp_path / ("x" * 253 + ".hs")),
            tmp_path)


def test_symlink_loops_and_trailing_slashes_fail_before_work(tmp_path, capsys, tasks):
    loop = tmp_path / "loop.hs"
    loop.symlink_to(tmp_path / "loop.hs")
    refused(capsys, "out-symlink-loop", ["score", "--tasks", tasks, "--out", loop], tmp_path)
    a = scores_file(tmp_path / "a.hs")
    dir_loop = tmp_path / "rep"
    dir_loop.symlink_to(tmp_path / "rep2")
    (tmp_path / "rep2").symlink_to(dir_loop)
    refused(capsys, "report-symlink-loop", ["report", a, "--out", dir_loop], tmp_path)
    refused(capsys, "out-trailing-slash", ["score", "--tasks", tasks, "--out", f"{tmp_path / 'newname'}/"],
            tmp_path)
    refused(capsys, "out-trailing-slash", ["compare", a, a, "--json", f"{tmp_path / 'new.json'}/"], tmp_path)
    assert not (tmp_path / "newname").exists()


def test_a_report_never_replaces_a_directory_with_other_files(tmp_path, capsys):
    a = scores_file(tmp_path / "a.hs")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("mine")
    refused(capsys, "report-dir-holds-other-files", ["report", a, "--out", mixed], tmp_path)
    with pytest.raises(HeadscoreError, match="holds other files"):
        write_report(HeadScores.load(a), mixed)
    assert sorted(os.listdir(mixed)) == ["notes.txt"]


def test_an_output_through_a_link_is_written_where_the_link_points(tmp_path, capsys):
    """The write follows the link as ``open`` would (and the check looks where the write goes)."""
    a = scores_file(tmp_path / "a.hs")
    (tmp_path / "real").mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "real" / "c.json")
    assert main(["compare", str(a), str(a), "--json", str(link)]) == 0
    assert link.is_symlink() and json.loads((tmp_path / "real" / "c.json").read_text())
    report_link = tmp_path / "rep-link"
    report_link.symlink_to(tmp_path / "real" / "rep")
    assert main(["report", str(a), "--out", str(report_link)]) == 0
    capsys.readouterr()
    assert report_link.is_symlink() and (tmp_path / "real" / "rep" / "index.html").is_file()
    assert not leftovers(tmp_path, tmp_path / "real")


def test_a_link_in_a_read_only_directory_to_a_writable_one(tmp_path, capsys, model_dir, tasks):
    """Case 2: ``--out ro/o.hs``, a link in a read-only directory to a writable one, is written through."""
    (tmp_path / "rw").mkdir()
    with tmpfs(tmp_path / "ro"):
        (tmp_path / "ro" / "o.hs").symlink_to(tmp_path / "rw" / "o.hs")
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "ro")], check=True)
        assert main(score_args(model_dir, tasks, "--out", tmp_path / "ro" / "o.hs")) == 0
        capsys.readouterr()
        assert HeadScores.load(tmp_path / "ro" / "o.hs").tasks == ["geo", "other"]
        refused(capsys, "out-read-only", score_args(model_dir, tasks, "--out", tmp_path / "ro" / "new.hs"),
                tmp_path / "rw")
    assert not leftovers(tmp_path / "rw")


# ------------------------------------------------------------------ what the final rename could not replace


def test_a_mount_point_is_refused_before_work(tmp_path, capsys, model_dir, tasks):
    """A bind-mounted output (``docker -v ./o.hs:/o.hs``, ``-v ./rep:/rep``) cannot be renamed over (EBUSY): it used
    to fail after the work; now before it. The mounts here are on one file system, where device numbers match."""
    a = scores_file(tmp_path / "a.hs")
    work = tmp_path / "work"
    (work / "rep").mkdir(parents=True)
    (work / "o.hs").write_text("in the container")
    (tmp_path / "host.hs").write_text("host")
    (tmp_path / "vol").mkdir()
    with bind_mount(tmp_path / "host.hs", work / "o.hs"), bind_mount(tmp_path / "vol", work / "rep"):
        refused(capsys, "out-mount-point", score_args(model_dir, tasks, "--out", work / "o.hs"), tmp_path)
        refused(capsys, "report-mount-point", ["report", a, "--out", work / "rep"], tmp_path)
        with pytest.raises(HeadscoreError, match="is a mount point"):
            write_report(HeadScores.load(a), work / "rep")
        with pytest.raises(HeadscoreError, match="is a mount point"):
            atomic_write(work / "o.hs", b"new")
        assert (work / "o.hs").read_text() == "host" and not leftovers(work, tmp_path / "vol")


def _sticky_file(directory: Path, file_uid: int, dir_uid: int) -> Path:
    """``directory/o.hs`` owned by ``file_uid`` in a new sticky, world-writable ``directory`` of ``dir_uid``."""
    directory.mkdir()
    os.chown(directory, dir_uid, dir_uid)
    os.chmod(directory, 0o1777)
    target = directory / "o.hs"
    target.write_text("old")
    os.chown(target, file_uid, file_uid)
    return target


_NO_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]  # root as an ordinary user of uid 0
_STICKY_PROBE = """import json, os, sys
from pathlib import Path
from headscore.output_files import new_temp_file, sticky_refuses
seen = []
for target in map(Path, sys.argv[1:]):
    predicted = sticky_refuses(target)
    tmp = new_temp_file(target.parent)
    try:
        os.replace(tmp, target)
        seen.append([predicted, False])
    except PermissionError:
        tmp.unlink()
        seen.append([predicted, True])
print(json.dumps(seen))
"""


def _needs_root_and_setpriv(tmp_path: Path) -> None:
    """Skip unless this process may give files to uid 65534 and run a command without capabilities."""
    reason = "files of other users and dropped capabilities need root and setpriv (CI runs as root)"
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip(reason)
    try:
        os.chown(tmp_path, 65534, 65534)
        os.chown(tmp_path, 0, 0)
    except OSError:
        pytest.skip(reason)
    if subprocess.run([*_NO_CAPABILITIES, "true"], capture_output=True).returncode != 0:
        pytest.skip(reason)


def test_the_sticky_check_predicts_what_the_kernel_does(tmp_path):
    """In a sticky directory only the owner of the file or of the directory, or a process with CAP_FOWNER, may
    rename over a file: the check made before any work says so exactly when the kernel then refuses, for root
    with its capabilities and without them (where uid 0 alone is no privilege)."""
    _needs_root_and_setpriv(tmp_path)
    owners = ((65534, 65534), (0, 65534), (65534, 0))  # (file, directory): another user's, one's own file, dir
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for caps, prefix in (("all", []), ("none", _NO_CAPABILITIES)):
        targets = [_sticky_file(tmp_path / f"{caps}-{f}-{d}", f, d) for f, d in owners]
        done = subprocess.run([*prefix, sys.executable, "-c", _STICKY_PROBE, *map(str, targets)], env=env,
                              capture_output=True, text=True, check=True)
        seen = json.loads(done.stdout)  # [predicted, refused by the kernel] per target
        assert [kernel for _, kernel in seen] == [caps == "none", False, False], (caps, seen)
        assert [predicted for predicted, _ in seen] == [kernel for _, kernel in seen], (caps, seen)


def test_another_users_file_in_a_sticky_directory_is_refused_before_work(tmp_path, capsys, model_dir, tasks):
    """``--out /tmp/o.hs``, where that file belongs to another user: the rename at the end would be refused (EPERM);
    it used to be found after the work, now before it. Root (with CAP_FOWNER) may replace it."""
    _needs_root_and_setpriv(tmp_path)
    target = _sticky_file(tmp_path / "sticky", 65534, 65534)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*_NO_CAPABILITIES, sys.executable, "-m", "headscore.cli",
                           *score_args(model_dir, tasks, "--out", target)], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert OUTPUT_CASES["out-sticky-other-user"] in done.stderr, done.stderr
    assert target.read_text() == "old" and not leftovers(target.parent)
    assert main(["compare", str(scores_file(tmp_path / "a.hs")), str(tmp_path / "a.hs"), "--json", str(target)]) == 0
    capsys.readouterr()
    assert json.loads(target.read_text())


def test_a_report_into_the_current_directory_is_refused(tmp_path, capsys, monkeypatch):
    """``cd rep && headscore report ../s.hs --out .`` used to swap out the directory the shell stands in (the shell
    was left in a deleted, empty one): refused, as is a directory above the current one."""
    a = scores_file(tmp_path / "a.hs")
    rep = tmp_path / "rep"
    assert main(["report", str(a), "--out", str(rep)]) == 0
    capsys.readouterr()
    monkeypatch.chdir(rep)
    refused(capsys, "report-out-cwd", ["report", a, "--out", "."], tmp_path)
    refused(capsys, "report-out-cwd", ["report", a, "--out", ".."], tmp_path)
    with pytest.raises(HeadscoreError, match="is the current directory or holds it"):
        write_report(HeadScores.load(a), ".")
    assert os.path.samefile(os.getcwd(), rep) and (rep / "summary.md").is_file()


def test_a_directory_named_like_a_report_file_is_not_deleted(tmp_path, capsys):
    """``rep/summary.md/`` a directory holding the user's files: its name is the report's, but it is no file the
    report wrote, and replacing the directory would delete it."""
    a = scores_file(tmp_path / "a.hs")
    (tmp_path / "rep" / "summary.md").mkdir(parents=True)
    (tmp_path / "rep" / "summary.md" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert main(["report", str(a), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "holds other files (summary.md/)" in err and err.count("\n") == 1, err
    with pytest.raises(HeadscoreError, match=r"holds other files \(summary.md/\)"):
        write_report(HeadScores.load(a), tmp_path / "rep")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- full disks


def test_score_on_a_full_disk_writes_nothing(tmp_path, capsys, model_dir, tasks):
    """Cases 4 and 7: one line, exit 2, and neither the scores file nor its export (all or nothing)."""
    with tmpfs(tmp_path / "disk", "16k") as disk:
        fill(disk, 0)
        refused(capsys, "out-disk-full", score_args(model_dir, tasks, "--out", disk / "o.hs"), disk)
        (disk / "filler").unlink()
        fill(disk, 4096)  # one page: the scores file fits, the export after it does not
        before = snapshot(disk)
        refused(capsys, "export-disk-full", score_args(model_dir, tasks, "--out", disk / "o.hs", "--export",
                                                       disk / "o.json"), disk)
        assert snapshot(disk) == before and not leftovers(disk)
        # the edge scores' export too: the scores file (with its edges) fits, the export after it does not
        (disk / "filler").unlink()
        fill(disk, 64 * 1024)
        before = snapshot(disk)
        refused(capsys, "export-disk-full", score_args(model_dir, tasks, "--edges", "--out", disk / "o.hs",
                                                       "--export-edges", disk / "e.json"), disk)
        assert snapshot(disk) == before and not leftovers(disk)


def test_report_on_a_full_disk_leaves_the_earlier_report(tmp_path, capsys):
    """Case 5: the earlier report is kept whole; no half-written directory."""
    a = scores_file(tmp_path / "a.hs")
    with tmpfs(tmp_path / "disk", "2m") as disk:
        assert main(["report", str(a), "--out", str(disk / "rep")]) == 0
        capsys.readouterr()
        fill(disk, 64 * 1024)
        refused(capsys, "report-disk-full", ["report", a, "--out", disk / "rep"], disk)
        assert sorted(os.listdir(disk / "rep")) == sorted(n for n in REPORT_FILES if not n.startswith(("scatter",
                                                                                                       "positions",
                                                                                                       "circuit")))
        assert not leftovers(disk)


def test_circuit_on_a_full_disk_leaves_the_earlier_circuits(tmp_path, capsys, model_dir, tasks):
    """The circuit directory is replaced whole or not at all: on a full disk the earlier one stays as it was."""
    edges = tmp_path / "e.hs"
    assert main(score_args(model_dir, tasks, "--edges", "--out", edges)) == 0
    circuit = ["circuit", str(edges), "--model", str(model_dir), "--tasks", str(tasks), "--edges", "5", "--sizes",
               "5", "--no-progress"]
    with tmpfs(tmp_path / "disk", "4m") as disk:
        assert main([*circuit, "--out", str(disk / "c")]) == 0
        capsys.readouterr()
        earlier = _report_files(disk / "c")
        fill(disk, 64 * 1024)
        refused(capsys, "circuit-disk-full", [*circuit, "--out", disk / "c"], disk)
        assert _report_files(disk / "c") == earlier and not leftovers(disk)


# ---------------------------------------------------------------------------------------------- signals


def _report_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# the report command with a pause once its files are in the temporary directory, before they are renamed
# into place; it says so in the file named by HEADSCORE_TEST_READY (a fixed wait or a poll for the temporary
# could not tell "writing" from "done" on a loaded machine: the command may finish between the two)
PAUSED_REPORT_CLI = """
import os, sys, time
from pathlib import Path
import headscore.report as report
written = report._write_files
def paused(*args, **kwargs):
    files = written(*args, **kwargs)
    Path(os.environ["HEADSCORE_TEST_READY"]).write_text("written")
    time.sleep(600)
    return files
report._write_files = paused
from headscore.cli import run
sys.argv[0] = "headscore"
run()
"""


@pytest.mark.slow  # 3-6 s on 2 cores: a report in a subprocess
def test_sigterm_while_a_report_is_written_leaves_the_old_one(tmp_path):
    """Case 6: a report killed by SIGTERM over an earlier one, while it writes (its files are in its temporary
    directory, not yet in place): the earlier report stays whole, no temporary is left, and the command says
    so (exit 143)."""
    old_scores, new_scores = scores_file(tmp_path / "old.hs", ("a", "b")), scores_file(tmp_path / "new.hs", ("c",))
    rep = tmp_path / "rep"
    assert main(["report", str(old_scores), "--out", str(rep)]) == 0
    old = _report_files(rep)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HEADSCORE_TEST_READY": str(ready)}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_REPORT_CLI, "report", str(new_scores), "--out", str(rep)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert ready.exists(), f"the report never wrote its files: {proc.poll()}"
    assert leftovers(tmp_path), "the files are not in a temporary directory"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (143, "headscore: terminated (SIGTERM)\n")
    assert _report_files(rep) == old and not leftovers(tmp_path)


@pytest.mark.parametrize("where", ["write", "swap", "two-renames"])
def test_an_interrupt_at_every_write_of_a_report_leaves_old_or_new(tmp_path, monkeypatch, where):
    """Fault injection: an interrupt (what SIGTERM raises in the command) at each file write of a report, or
    at the swap that puts it in place (atomic exchange, or two renames where the file system has no
    exchange), leaves the earlier report whole, never a mix, and no temporary; without one, the new report."""
    import headscore.output_files as of
    from headscore.cli import Terminated

    old_scores, new_scores = scores_file(tmp_path / "old.hs", ("a", "b")), scores_file(tmp_path / "new.hs", ("c",))
    rep = tmp_path / "rep"
    write_report(HeadScores.load(old_scores), rep)
    old = _report_files(rep)
    if where == "two-renames":
        monkeypatch.setattr(of, "_exchange", lambda a, b: False)
    owner, victim = {"write": (of.os, "replace"), "swap": (of, "_exchange"), "two-renames": (of.os, "rename")}[where]
    real = getattr(owner, victim)
    for k in range(1, 20):
        calls = []

        def interrupted(*args, k=k, calls=calls):
            calls.append(args)
            if len(calls) == k:
                raise Terminated(signal.SIGTERM)
            return real(*args)

        monkeypatch.setattr(owner, victim, interrupted)
        try:
            write_report(HeadScores.load(new_scores), rep)
        except Terminated:
            assert _report_files(rep) == old and not leftovers(tmp_path), k
            continue
        finally:
            monkeypatch.setattr(owner, victim, real)
        assert len(calls) < k and k > 1  # every point was tried
        now = _report_files(rep)
        assert "### c" in now["summary.md"].decode() and not [n for n in now if now[n] == old.get(n)]
        break
    else:
        pytest.fail("the report never completed")


# ---------------------------------------------------------------------------------- the library's own parts


def test_output_set_is_all_or_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    with pytest.raises(RuntimeError), OutputSet() as outputs:
        outputs.write(tmp_path / "a.txt", b"new a")
        outputs.write(tmp_path / "b.txt", b"new b")
        raise RuntimeError("the run fails after staging")
    assert (tmp_path / "a.txt").read_text() == "old a" and not (tmp_path / "b.txt").exists()
    assert not leftovers(tmp_path)
    with OutputSet() as outputs:
        outputs.write(tmp_path / "a.txt", b"new a")
        outputs.write(tmp_path / "b.txt", b"new b")
        assert (tmp_path / "a.txt").read_text() == "old a"  # nothing lands before the end
    assert (tmp_path / "a.txt").read_text() == "new a" and (tmp_path / "b.txt").read_text() == "new b"


def _busy_at(path: Path, real):
    """``os.replace`` that fails with EBUSY (what a mount point answers) for the destination ``path``."""
    def replace(src, dst):
        if Path(dst) == path:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src), None, str(dst))
        return real(src, dst)
    return replace


@pytest.mark.parametrize("aside", ["exchange", "link", "rename"])
def test_a_failed_commit_puts_back_the_outputs_already_in_place(tmp_path, monkeypatch, aside):
    """The last output's rename fails after the others were in place (``--export`` a mount point, found only then):
    every earlier destination is put back and every new one removed, so "nothing was written" is true; each
    earlier version waited swapped with its temporary (``renameat2``), hard-linked or renamed aside, whichever
    the system allows."""
    import headscore.output_files as of

    if aside != "exchange":
        monkeypatch.setattr(of, "_exchange", lambda a, b: False)
    if aside == "rename":
        monkeypatch.setattr(of, "_link", lambda a, b: False)
    (tmp_path / "a.hs").write_text("old a")
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "x").write_text("old x")
    (tmp_path / "rep2").mkdir()
    (tmp_path / "rep2" / "x").write_text("old x2")
    (tmp_path / "last.csv").write_text("old last")
    before = snapshot(tmp_path)
    monkeypatch.setattr(of.os, "replace", _busy_at(tmp_path / "last.csv", os.replace))
    with pytest.raises(OutputWriteError, match=f"cannot write {tmp_path / 'last.csv'}: Device or resource busy; "
                                               "nothing was written"), OutputSet() as outputs:
        outputs.write(tmp_path / "a.hs", b"new a")
        outputs.write(tmp_path / "b.csv", b"new b")
        (outputs.directory(tmp_path / "rep", ["x"]) / "x").write_text("new x")
        (outputs.directory(tmp_path / "rep2", ["x"]) / "x").write_text("new x2")
        (outputs.directory(tmp_path / "rep3", ["x"]) / "x").write_text("new x3")
        outputs.write(tmp_path / "last.csv", b"new last")
    assert snapshot(tmp_path) == before


def test_a_commit_refused_by_the_kernel_is_undone(tmp_path):
    """The review's case: ``--out`` renamed into place, then ``--export``'s rename refused by the kernel (EBUSY, a
    file bind-mounted there after the checks): ``--out`` holds its earlier content again."""
    (tmp_path / "scores.hs").write_text("OLD")
    (tmp_path / "table.csv").write_text("table")
    (tmp_path / "host.csv").write_text("host")
    outputs = OutputSet()
    outputs.write(tmp_path / "scores.hs", b"NEW")
    outputs.write(tmp_path / "table.csv", b"NEW")
    with bind_mount(tmp_path / "host.csv", tmp_path / "table.csv"):
        with pytest.raises(OutputWriteError, match="table.csv: Device or resource busy; nothing was written"), outputs:
            pass
        assert (tmp_path / "scores.hs").read_text() == "OLD" and (tmp_path / "table.csv").read_text() == "host"
    assert (tmp_path / "table.csv").read_text() == "table" and not leftovers(tmp_path)


def test_an_output_that_cannot_be_put_back_is_named(tmp_path, monkeypatch):
    """Where undoing one fails too, the line names each output written all the same and where its earlier version
    is kept (that file is left alone); the others are put back."""
    import headscore.output_files as of

    for name in ("a.hs", "b.csv", "c.json"):
        (tmp_path / name).write_text(f"old {name}")
    real_exchange, calls = of._exchange, []

    def exchange(a, b):  # installs a.hs, installs b.csv, fails to put b.csv back, puts a.hs back
        calls.append(b)
        if len(calls) == 3:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(b))
        return real_exchange(a, b)

    monkeypatch.setattr(of, "_exchange", exchange)
    monkeypatch.setattr(of.os, "replace", _busy_at(tmp_path / "c.json", os.replace))
    with pytest.raises(OutputWriteError) as caught, OutputSet() as outputs:
        for name in ("a.hs", "b.csv", "c.json"):
            outputs.write(tmp_path / name, f"new {name}".encode())
    shown = str(caught.value)
    m = re.fullmatch(rf"cannot write {re.escape(str(tmp_path / 'c.json'))}: Device or resource busy; these outputs "
                     rf"were written all the same and could not be undone: {re.escape(str(tmp_path / 'b.csv'))} "
                     rf"\(its earlier version is (.+)\)", shown)
    assert m, shown
    kept = Path(m.group(1))
    assert kept.read_text() == "old b.csv" and leftovers(tmp_path) == [kept]
    assert [(tmp_path / n).read_text() for n in ("a.hs", "b.csv", "c.json")] == ["old a.hs", "new b.csv", "old c.json"]


def test_a_failed_write_removes_the_directories_it_made(tmp_path):
    """"Nothing was written" includes the missing parent directories the outputs were staged in: removed again
    (directories that were there stay), and kept when the write succeeds."""
    (tmp_path / "there").mkdir()
    with pytest.raises(RuntimeError), OutputSet() as outputs:
        outputs.directory(tmp_path / "new" / "deeper" / "rep", ["x"])
        outputs.write(tmp_path / "new" / "o.json", b"{}")
        outputs.write(tmp_path / "there" / "new" / "o.json", b"{}")
        raise RuntimeError("the run fails after staging")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["there"]
    with OutputSet() as outputs:
        (outputs.directory(tmp_path / "new" / "deeper" / "rep", ["x"]) / "x").write_text("1")
    assert (tmp_path / "new" / "deeper" / "rep" / "x").read_text() == "1"


def test_a_directory_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    with OutputSet() as outputs:
        d = outputs.directory(out, ["x", "y"])
        (d / "x").write_text("1")
        (d / "y").write_text("1")
    os.chmod(out, 0o750)
    with OutputSet() as outputs:
        (outputs.directory(out, ["x", "y"]) / "x").write_text("2")
    assert sorted(os.listdir(out)) == ["x"] and (out / "x").read_text() == "2"  # y of the earlier run is gone
    assert os.stat(out).st_mode & 0o777 == 0o750
    with pytest.raises(HeadscoreError, match="holds other files"), OutputSet() as outputs:
        outputs.directory(out, ["y"])


def test_a_replaced_file_keeps_its_mode_and_a_new_one_takes_the_umask(tmp_path):
    """As ``open(path, "w")`` does: a private 0600 results file stays 0600 when written again (it became 0644),
    alone and in a set of outputs; a new file takes the umask's mode."""
    from headscore.output_files import atomic_write

    private, shared = tmp_path / "private.hs", tmp_path / "new.json"
    private.write_bytes(b"old")
    os.chmod(private, 0o600)
    old_mask = os.umask(0o022)
    try:
        atomic_write(private, b"new")
        with OutputSet() as outputs:
            outputs.write(private, b"newer")
            outputs.write(shared, b"{}")
    finally:
        os.umask(old_mask)
    assert private.read_bytes() == b"newer" and os.stat(private).st_mode & 0o777 == 0o600
    assert os.stat(shared).st_mode & 0o777 == 0o644


def test_a_killed_writes_temporaries_are_removed_a_day_later(tmp_path):
    """What a write killed by SIGKILL leaves (a hidden temporary file, a report's temporary directory, a file set
    aside) is removed by a later write into that directory once it is a day old; a young one (a write in
    progress) and other hidden files stay (nothing removed them before)."""
    from headscore.output_files import STALE_TEMP_S, atomic_write

    old_file, old_dir = tmp_path / ".hs-12vx97nv.tmp", tmp_path / ".hs-abcdefgh.tmp"
    aside = tmp_path / ".hs-a1b2c3d4.old"
    young, other = tmp_path / ".hs-zzzzzzzz.tmp", tmp_path / ".hs-notours.tmp"
    old_file.write_bytes(b"half")
    old_dir.mkdir()
    (old_dir / "heatmap.png").write_bytes(b"png")
    for path in (aside, young, other):
        path.write_bytes(b"x")
    day_ago = time.time() - STALE_TEMP_S - 60
    for path in (old_file, old_dir, aside, other):
        os.utime(path, (day_ago, day_ago))
    atomic_write(tmp_path / "scores.hs", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hs-notours.tmp", ".hs-zzzzzzzz.tmp", "scores.hs"]


def test_disk_errors_become_one_line_naming_the_destination(tmp_path, monkeypatch):
    """Fault injection (no root needed): ENOSPC, EROFS, EIO while writing come out as OutputWriteError naming
    the file the user asked for, and the old file is unchanged."""
    target = tmp_path / "kept.json"
    target.write_text("old")
    import headscore.output_files as of

    for code in (errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT):
        def failing(path, data, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(of, "write_bytes", failing)
        with pytest.raises(OutputWriteError, match=f"cannot write {target}: {os.strerror(code)}"):
            atomic_write(target, b"new")
        assert target.read_text() == "old" and not leftovers(tmp_path)
    monkeypatch.undo()

    def failing_rename(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))

    monkeypatch.setattr(of.os, "replace", failing_rename)
    with pytest.raises(OutputWriteError, match="Read-only file system"):
        atomic_write(target, b"new")
    assert target.read_text() == "old"


def test_a_signal_during_the_commit_waits_for_it(tmp_path):
    """SIGTERM raised while the renames run is held back until every output is in place."""
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(sorted(os.listdir(tmp_path))))
    try:
        import headscore.output_files as of

        real_install = of._Staged.install

        raised = []

        def install_then_signal(self, *args, **kwargs):
            real_install(self, *args, **kwargs)
            if not raised:
                raised.append(True)
                signal.raise_signal(signal.SIGTERM)

        of._Staged.install = install_then_signal
        try:
            with OutputSet() as outputs:
                outputs.write(tmp_path / "a", b"1")
                outputs.write(tmp_path / "b", b"2")
        finally:
            of._Staged.install = real_install
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert got == [["a", "b"]]  # the handler ran once, after both files were there


# ---------------------------------------------------------------------------------------- scores files


def _raw_scores_file(path: Path, *, tasks: str = '["a"]', extra: str = "{}", counts=(1,)) -> Path:
    n = len(counts)
    meta = {"format": "headscore/1", "tasks": tasks, "method": "taylor", "model": "m", "extra": extra}
    path.write_bytes(save({"values": torch.zeros(n, 2, 2, dtype=torch.float64),
                           "stderr": torch.zeros(n, 2, 2, dtype=torch.float64),
                           "counts": torch.tensor(counts, dtype=torch.int64)}, metadata=meta))
    return path


def test_a_flipped_bit_is_found(tmp_path, capsys):
    path = scores_file(tmp_path / "s.hs")
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x10  # in the data
    (tmp_path / "data.hs").write_bytes(bytes(blob))
    refused(capsys, "scores-checksum", ["compare", tmp_path / "data.hs", path], tmp_path)
    blob = bytearray(path.read_bytes())
    at = blob.index(b'"taylor"') + 2
    blob[at] ^= 0x01  # in the metadata ("taylor" -> "uaylor"), the JSON stays valid
    (tmp_path / "meta.hs").write_bytes(bytes(blob))
    refused(capsys, "scores-checksum", ["report", tmp_path / "meta.hs", "--out", tmp_path / "r"], tmp_path)
    assert HeadScores.load(_raw_scores_file(tmp_path / "old.hs")).tasks == ["a"]  # no checksum: older files load


def test_broken_scores_files_are_one_line(tmp_path, capsys):
    (tmp_path / "dir.hs").mkdir()
    refused(capsys, "scores-is-directory", ["compare", tmp_path / "dir.hs", tmp_path / "dir.hs"], tmp_path)
    neg = _raw_scores_file(tmp_path / "neg.hs", counts=(-3,))
    refused(capsys, "scores-negative-counts", ["report", neg, "--out", tmp_path / "r"], tmp_path)
    deep = _raw_scores_file(tmp_path / "deep.hs", extra="[" * 100_000 + "]" * 100_000)
    refused(capsys, "scores-deep-metadata", ["compare", deep, deep], tmp_path)
    lone = _raw_scores_file(tmp_path / "lone.hs", tasks='["geo\\ud800"]')
    refused(capsys, "scores-lone-surrogate", ["report", lone, "--out", tmp_path / "r"], tmp_path)
    refused(capsys, "scores-lone-surrogate", ["compare", lone, lone], tmp_path)
    with pytest.raises(ValueError, match="lone surrogate"):
        HeadScores(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.ones(1, dtype=torch.int64), ["geo\ud800"],
                   "taylor", "m")


def test_top_k_of_nothing_is_refused():
    s = HeadScores(torch.rand(1, 2, 3, dtype=torch.float64), torch.zeros(1, 2, 3, dtype=torch.float64),
                   torch.ones(1, dtype=torch.int64), ["a"], "taylor", "m")
    for k in (-1, 0, 1.5, True):
        with pytest.raises(HeadscoreError, match="top_k needs k >= 1"):
            s.top_k(k)
    assert len(s.top_k(100)) == 6


def test_a_damaged_checkpoint_is_refused(tmp_path):
    from headscore.accumulate import TaskAccumulator
    from headscore.checkpoint import load_checkpoint, save_checkpoint

    acc = TaskAccumulator(["a", "b"], 2, 3)
    acc.add(torch.tensor([0, 1]), torch.rand(2, 2, 3, dtype=torch.float64))
    path = save_checkpoint(tmp_path / "run.ckpt", acc, 1, 4, {"model": "m"})
    state, done, total, _ = load_checkpoint(path)
    assert (done, total) == (1, 4) and torch.equal(state["sum"], acc.state_dict()["sum"])
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(HeadscoreError, match="not a headscore checkpoint .checksum mismatch"):
        load_checkpoint(path)


def test_kernel_true_without_a_gpu_is_one_clear_error(monkeypatch):
    """``score(..., kernel=True)`` from Python on a CPU without Triton's interpreter: HeadscoreError at once
    (the suite may run with the interpreter on, for the kernel tests: it is switched off here)."""
    from tiny import tiny_model

    import headscore
    import headscore.kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "is_interpreted", lambda fn: False)
    lm = tiny_model("llama")
    with pytest.raises(HeadscoreError, match="kernel=True: the fused Triton kernel needs a CUDA device"):
        headscore.score(lm, [headscore.Example("ab", "c", "t")], kernel=True, progress=False)
