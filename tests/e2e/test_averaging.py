"""``--model.averaging``: the average is what a run validates, checkpoints and tests, the last
iterate is tested beside it, SWAD ends with its valley's average, and a killed run resumes
to the same result."""

from __future__ import annotations

import re
import signal

import pytest
import torch

from e2e.command import QUIET, dgkit, interrupt, results, start, steps_logged, wait_for

SHORT = ["fit", "--model.backbone=mlp", "--trainer.max_steps=40", *QUIET]


def test_sma_is_validated_checkpointed_and_tested_with_the_last_iterate_beside_it(tmp_path):
    result = dgkit(*SHORT, "--model.averaging", "sma", "--model.averaging.start", "10", cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    run = tmp_path / "runs" / "version_0"
    found = results(run)
    scores = found["domains"]["75"]
    assert {"accuracy", "accuracy (last iterate)"} <= set(scores)
    assert "accuracy (last iterate)" in result.out
    # Validated at steps 19 and 39: the kept checkpoint's average spans steps 10 to 19 or 10 to 39.
    averaged = found["averaging"]["averaged"]
    assert averaged in ("SMA of 10 steps from step 10", "SMA of 30 steps from step 10"), averaged
    assert f"averaged weights: {averaged}" in result.out
    # The checkpoint's weights are the average; the trained ones are kept beside them.
    ckpt = torch.load(tmp_path / found["ckpt_path"], weights_only=True)
    weight = next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    assert not torch.equal(ckpt["state_dict"][weight], ckpt["current_model_state"][weight])
    # Testing the checkpoint again tests the same average.
    again = dgkit("test", "--ckpt_path", str(tmp_path / found["ckpt_path"]), *QUIET, cwd=tmp_path)
    assert again.code == 0, again.text[-3000:]
    assert f"averaged weights: {averaged}" in again.out
    tested = results(next(run.glob("test-*")))
    assert tested["domains"]["75"]["accuracy"] == scores["accuracy"]


def test_swad_tests_the_average_of_its_loss_valley(tmp_path):
    result = dgkit("fit", "--model.backbone=mlp", "--trainer.max_steps=120", "--trainer.val_check_interval=4",
                   "--model.averaging", "swad", *QUIET, cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    run = tmp_path / "runs" / "version_0"
    found = results(run)
    assert found["ckpt_path"].endswith("checkpoints/swad.ckpt")
    assert (run / "checkpoints" / "swad.ckpt").is_file()
    assert "checkpoint: runs/version_0/checkpoints/swad.ckpt" in result.out
    averaged = found["averaging"]["averaged"]
    span = re.fullmatch(r"steps (\d+)-(\d+) \(N=(\d+)\)", averaged)
    assert span, averaged
    assert 0 <= int(span[1]) < int(span[2]) <= 119
    # The valley's start looks back over the tolerance window, so it may precede convergence.
    assert 0 <= found["averaging"]["valley"]["converged_at"] <= 119
    assert "accuracy (last iterate)" in found["domains"]["75"]


@pytest.mark.parametrize("method", [["ema", "--model.averaging.decay", "0.9"], ["swad"]], ids=["ema", "swad"])
def test_a_killed_averaging_run_resumes_to_the_uninterrupted_result(method, tmp_path):
    args = ["fit", "--model.backbone=mlp", "--model.dropout=0.2", "--trainer.max_steps=200",
            "--trainer.val_check_interval=10", "--last_checkpoint.every_n_steps=1000",
            "--model.averaging", *method, *QUIET]
    for folder in ("whole", "killed"):
        (tmp_path / folder).mkdir()
    whole = dgkit(*args, cwd=tmp_path / "whole")
    assert whole.code == 0, whole.text[-3000:]
    proc = start(*args, cwd=tmp_path / "killed")
    run = tmp_path / "killed" / "runs" / "version_0"
    wait_for(lambda: steps_logged(run) >= 75, what="training to pass step 75")
    returncode, _, err = interrupt(proc, signal.SIGTERM)
    assert returncode == 143, err[-3000:]
    resumed = dgkit(*args, cwd=tmp_path / "killed")
    assert resumed.code == 0, resumed.text[-3000:]
    assert "resuming the unfinished run" in resumed.err
    expected = results(tmp_path / "whole" / "runs" / "version_0")
    found = results(run)
    assert found["domains"] == expected["domains"]
    assert found["averaging"] == expected["averaging"]


def test_bad_averaging_settings_are_refused_in_one_line(tmp_path):
    unknown = dgkit(*SHORT, "--model.averaging", "median", cwd=tmp_path)
    assert unknown.code == 2
    line = unknown.error_line()
    assert "'median'" in line and "Known averaging methods: ema, none, sma, swad." in line
    decay = dgkit(*SHORT, "--model.averaging", "ema", "--model.averaging.decay", "1.5", cwd=tmp_path)
    assert decay.code == 2 and "model.averaging.decay" in decay.error_line()
    # A run trained without averaging cannot resume with it: its average was never kept
    # (Lightning would silently lay the checkpoint's settings over the flag).
    (tmp_path / "plain").mkdir()
    plain = dgkit(*SHORT, "--trainer.max_steps=10", cwd=tmp_path / "plain")
    assert plain.code == 0, plain.text[-3000:]
    ckpt = tmp_path / "plain" / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = dgkit(*SHORT, "--trainer.max_steps=20", "--model.averaging", "sma", "--ckpt_path", str(ckpt),
                    cwd=tmp_path / "plain")
    assert resumed.code == 2 and "trained with averaging none" in resumed.error_line()


COMPOSED = {"sam": [], "udim": ["--model.algorithm.warmup_steps=20"], "coral": [], "drm": [], "adanpc": []}
OWN_STREAMS = {"drm": {f"accuracy_head{i}" for i in range(6)}, "adanpc": {"accuracy (no adaptation)"}}


@pytest.mark.parametrize("alias", COMPOSED)
def test_swad_composes_with_two_pass_steps_penalties_heads_and_test_time_memories(alias, tmp_path):
    """SWAD over SAM's and UDIM's two-pass steps, CORAL's penalty, DRM's heads and AdaNPC's
    memory: the valley's average is tested with the algorithm's own streams beside it (AdaNPC's
    memory embedded by the averaged featurizer; testing swad.ckpt again gives the same result)."""
    result = dgkit("fit", "--algo", alias, *COMPOSED[alias], "--model.backbone=mlp", "--trainer.max_steps=60",
                   "--trainer.val_check_interval=4", "--model.averaging", "swad",
                   "--model.averaging.n_converge=1", "--model.averaging.n_tolerance=3", *QUIET, cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    found = results(tmp_path / "runs" / "version_0")
    assert found["ckpt_path"].endswith("checkpoints/swad.ckpt")
    assert re.fullmatch(r"steps \d+-59 \(N=1[56]\)", found["averaging"]["averaged"]), found["averaging"]
    scores = found["domains"]["75"]
    assert {"accuracy", "accuracy (last iterate)", *OWN_STREAMS.get(alias, ())} <= set(scores), scores
    if alias == "adanpc":
        again = dgkit("test", "--ckpt_path", str(tmp_path / found["ckpt_path"]), *QUIET, cwd=tmp_path)
        assert again.code == 0, again.text[-3000:]
        tested = results(next((tmp_path / "runs" / "version_0").glob("test-*")))["domains"]["75"]
        assert tested["accuracy"] == scores["accuracy"]
        assert tested["accuracy (no adaptation)"] == scores["accuracy (no adaptation)"]
