"""Fault injection: real train.py processes on the micro model are stopped by signals, killed inside a save, given
damaged checkpoints, a full or read-only disk and bad data. After each fault, nothing is lost that the run had
not yet saved, and the run, resumed, ends with the weights of an uninterrupted one, bit for bit."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import IMAGE_SIZE, ROOT, micro_dir, run_train, weights  # noqa: F401 (micro_dir is a fixture)

import train
from data import ShapesWorld, export_shapes

LORA = ["--stage", "finetune", "--lora-rank", 4, "--lora-alpha", 8, "--lora-dropout", 0.1, "--lr", "1e-2",
        "--batch-size", 4, "--seed", 5]  # dropout draws from the RNG, so a resume must restore it exactly


def start(*args, workers=0) -> subprocess.Popen:
    """train.py in its own process group, as a scheduler starts it."""
    return subprocess.Popen([sys.executable, "train.py", *map(str, args), "--workers", str(workers)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})


def wait_for(condition, proc: subprocess.Popen, timeout=120, poll=0.005):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"train.py ended first ({proc.returncode}):\n{proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def saving(out: Path) -> bool:
    """A checkpoint is being written: its temporary dir exists."""
    root = out / "checkpoints"
    return root.is_dir() and any(name.startswith(".tmp_") for name in os.listdir(root))


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def resume(args, out: Path, capsys) -> str:
    """Resume in this process; -> what it printed."""
    capsys.readouterr()
    run_train(*args, "--out", out, "--resume")
    captured = capsys.readouterr()
    return captured.out + captured.err


@pytest.fixture(scope="module")
def whole(micro_dir, tmp_path_factory):  # noqa: F811
    """The uninterrupted LoRA run that each interrupted one must reproduce: (its args, its output dir), which
    keeps the checkpoints of steps 23 and 24."""
    args = [*LORA, "--init", micro_dir, "--max-steps", 24]
    out = tmp_path_factory.mktemp("whole")
    run_train(*args, "--out", out, "--save-every", 1, "--keep", 2)
    return args, out


# ----------------------------------------------------------------------------- preemption


def test_sigterm_to_the_process_group_saves_the_step_and_resume_is_bit_identical(whole, tmp_path, capsys):
    """As Slurm does, SIGTERM reaches the main process and its DataLoader worker alike."""
    args, reference = whole
    args = [*args, "--save-every", 1000, "--log-every", 1]  # the only checkpoint is the preemption's
    out = tmp_path / "run"
    proc = start(*args, "--out", out, workers=1)
    wait_for(lambda: steps_logged(out) >= random.Random(0).randint(3, 12), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == train.EXIT_PREEMPTED, stderr[-2000:]
    (saved,) = checkpoints(out)
    step = int(saved[5:])
    assert 3 <= step < 24 and f"SIGTERM: stopped after step {step}, saved {out / 'checkpoints' / saved}" in stdout
    assert "Traceback" not in stderr and not (out / "model.safetensors").exists()
    assert f"steps from step {step};" in resume(args, out, capsys)
    assert_same_weights(out, reference)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGKILL], ids=["SIGUSR1", "SIGKILL"])
def test_signal_during_a_save_then_resume_is_bit_identical(sig, whole, tmp_path, capsys):
    """SIGUSR1 (Slurm's warning) waits for the save to finish; SIGKILL leaves a .tmp_ dir that is never resumed."""
    args, reference = whole
    args = [*args, "--save-every", 1, "--keep", 2]
    out = tmp_path / "run"
    proc = start(*args, "--out", out)
    wait_for(lambda: len(checkpoints(out)) >= 1 and saving(out), proc, poll=0.0002)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and saving(out)  # killed inside the save
    else:
        assert proc.returncode == train.EXIT_PREEMPTED and not saving(out)  # the save it was inside finished
        assert f"SIGUSR1: stopped after step {int(checkpoints(out)[-1][5:])}," in stdout
    step = int(checkpoints(out)[-1][5:])
    assert f"steps from step {step};" in resume(args, out, capsys)
    assert not saving(out)  # the next save cleared the killed one's leftovers
    assert_same_weights(out, reference)


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_both_ranks_and_resume_is_bit_identical(micro_dir, tmp_path):  # noqa: F811
    """2 gloo processes: a SIGTERM to one rank stops both after the same step (neither waits for the other);
    a SIGTERM to torchrun is passed on to both. Each time every rank exits 75 and rank 0 has saved."""
    args = [*LORA, "--init", micro_dir, "--batch-size", 2, "--max-steps", 60, "--save-every", 1000, "--log-every", 1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py", *map(str, args)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(torchrun + ["--out", str(tmp_path / "whole")], cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=300)
    out = tmp_path / "run"
    done = 0
    for target in ("rank 1", "torchrun"):
        proc = subprocess.Popen(torchrun + ["--out", str(out), "--resume"], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        wait_for(lambda: steps_logged(out) >= done + 5, proc)  # noqa: B023
        proc.send_signal(signal.SIGTERM) if target == "torchrun" else os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)  # a hung rank would time out here
        saved = checkpoints(out)[-1]
        assert proc.returncode != 0 and int(saved[5:]) > done, stderr[-3000:]
        if target == "rank 1":  # torchrun reports each rank's exit code; signalled itself, it reports the signal
            assert stderr.count(f"exitcode  : {train.EXIT_PREEMPTED} ") == 2, stderr[-3000:]
        assert f": stopped after step {int(saved[5:])}, saved" in stdout
        done = int(saved[5:])
    subprocess.run(torchrun + ["--out", str(out), "--resume"], cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=300)
    assert_same_weights(out, tmp_path / "whole")


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the worker torchrun started with RANK=rank."""
    for pid in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        if f"RANK={rank}\0" in Path(f"/proc/{pid}/environ").read_text():
            return int(pid)
    raise AssertionError(f"no rank {rank} under torchrun {torchrun_pid}")


# ----------------------------------------------------------------------------- damaged checkpoints


def truncate(path: Path):
    os.truncate(path, path.stat().st_size // 2)


def flip_a_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, name, problem", [
    (truncate, "trainable.safetensors", "trainable.safetensors does not match its checksum"),
    (flip_a_byte, "train_state.pt", "train_state.pt does not match its checksum"),
    (os.remove, "init.json", "init.json is missing"),
    (os.remove, "SHA256SUMS", "SHA256SUMS is missing"),
])
def test_resume_falls_back_past_a_damaged_checkpoint(damage, name, problem, whole, tmp_path, capsys):
    args, reference = whole
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")  # step_000023 and step_000024
    shutil.copy(reference / "tokenizer.model", out)
    damage(out / "checkpoints" / "step_000024" / name)
    printed = resume(args, out, capsys)
    newest = out / "checkpoints" / "step_000024"
    assert f"--resume: {newest} is damaged ({problem}); falling back to the one before it\n" in printed
    assert "steps from step 23;" in printed
    assert_same_weights(out, reference)
    assert train.checkpoint_problem(newest) is None  # saved again at step 24


def test_resume_stops_when_every_checkpoint_is_damaged(whole, tmp_path):
    args, reference = whole
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    shutil.copy(reference / "tokenizer.model", out)
    for ckpt in (out / "checkpoints").glob("step_*"):
        truncate(ckpt / "train_state.pt")
    with pytest.raises(SystemExit, match=r"^error: --resume: no intact checkpoint in .*checkpoints \(step_000024: "
                       r"train_state.pt does not match its checksum; step_000023: .*\); move them away"):
        run_train(*args, "--out", out, "--resume")


def test_damaged_init_weights_are_one_line_naming_the_file(micro_dir, tmp_path):  # noqa: F811
    init = tmp_path / "init"
    shutil.copytree(micro_dir, init)
    truncate(init / "model.safetensors")
    with pytest.raises(SystemExit, match=f"^error: --init {init}: {init / 'model.safetensors'}: .*incomplete"):
        run_train("--stage", "finetune", "--init", init, "--out", tmp_path / "out", "--max-steps", 1)


# ----------------------------------------------------------------------------- disk faults


ENOSPC_WRAPPER = """
import errno, os, sys
import train
save_file = train.save_file
def full_disk(tensors, path):  # the disk fills up after the first checkpoint
    if "step_000002" not in str(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save_file(tensors, path)
train.save_file = full_disk
train.main(sys.argv[1:])
"""


def mount_tmpfs(path: Path, options: str) -> bool:
    """Mount (or remount) a size-limited tmpfs at path: a real full disk. False where mount is refused."""
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except FileNotFoundError:  # no mount command
        return False


def test_full_and_read_only_disks_keep_the_previous_checkpoint(micro_dir, tmp_path):  # noqa: F811
    """A tmpfs with room for one checkpoint (root, as in CI); elsewhere a wrapper around the weights' write that
    raises OSError(ENOSPC). Either way the save fails at step 4 and step 2 stays intact."""
    args = [*map(str, LORA), "--init", str(micro_dir), "--max-steps", "6", "--save-every", "2", "--keep", "2"]
    run_train(*args, "--out", tmp_path / "whole")
    ckpt = tmp_path / "whole" / "checkpoints" / "step_000006"
    size = sum(-(-p.stat().st_size // 4096) * 4096 for p in ckpt.iterdir())  # tmpfs allocates whole pages
    out = tmp_path / "run"
    root = out / "checkpoints"
    tmpfs = mount_tmpfs(root, f"size={size * 3 // 2}")
    try:
        cmd = ["train.py"] if tmpfs else ["-c", ENOSPC_WRAPPER]
        result = subprocess.run([sys.executable, *cmd, *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                                text=True, timeout=240)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.splitlines()[-1] == (f"error: cannot save {root / 'step_000004'}: [Errno 28] No space "
                                                  f"left on device; {root / 'step_000002'} is intact")
        assert os.listdir(root) == ["step_000002"] and train.checkpoint_problem(root / "step_000002") is None
        if tmpfs:  # read-only: the save cannot even make its directory
            assert mount_tmpfs(root, "remount,ro")
            with pytest.raises(SystemExit, match=re.escape(
                    f"error: cannot save {root / 'step_000004'}: [Errno 30] Read-only file system: "
                    f"'{root / '.tmp_step_000004'}'; {root / 'step_000002'} is intact")):
                run_train(*args, "--out", out, "--resume")
            assert mount_tmpfs(root, f"remount,rw,size={size * 4}")
        assert os.listdir(root) == ["step_000002"]
        run_train(*args, "--out", out, "--resume")
        assert_same_weights(out, tmp_path / "whole")
    finally:
        if tmpfs:
            subprocess.run(["umount", str(root)], check=True)


# ----------------------------------------------------------------------------- data faults


def test_all_bad_records_with_a_new_tokenizer_report_no_usable_records(tmp_path):
    bad = [{"id": 1, "conversations": []}, {"id": 2}, "not a record"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match=r"^error: .*bad.json: no usable records \(skipped 3 of 3 records: "
                       "2 empty conversation, 1 malformed record\\)$"):
        run_train("--stage", "finetune", "--init", "tiny", "--data", tmp_path / "bad.json", "--out", tmp_path / "o")


def test_malformed_jsonl_lines_are_skipped_counted_and_named(micro_dir, tmp_path, capsys):  # noqa: F811
    data = export_shapes(ShapesWorld(image_size=IMAGE_SIZE), tmp_path, 24)
    lines = [json.dumps(r) for r in json.loads(data.read_text())]
    lines[2], lines[9] = lines[2][:-7], "{not json"  # cut short mid-write; garbage
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    run_train("--stage", "finetune", "--init", micro_dir, "--data", tmp_path / "data.jsonl", "--out", tmp_path / "o",
              "--batch-size", 4)
    assert "skipped 2 of 24 records: 2 malformed line (lines 3, 10)" in capsys.readouterr().out


def test_an_image_replaced_under_a_running_job_is_skipped_and_counted(micro_dir, tmp_path):  # noqa: F811
    data = export_shapes(ShapesWorld(image_size=IMAGE_SIZE), tmp_path, 48)
    out = tmp_path / "o"
    proc = start("--stage", "finetune", "--init", micro_dir, "--data", data, "--out", out, "--batch-size", 4,
                 "--epochs", 2, "--save-every", 1, workers=2)
    wait_for(lambda: checkpoints(out), proc)  # step 1 of 12 in the first epoch: every image has been readable
    os.kill(proc.pid, signal.SIGSTOP)
    image = tmp_path / "images" / "train_000005.png"
    image.write_bytes(image.read_bytes()[:40])  # another job rewrites it; we read it half-written
    os.kill(proc.pid, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-2000:]
    assert "skipped 1 of 48 records: 1 unreadable image" in stdout  # read again in the second epoch, and skipped
