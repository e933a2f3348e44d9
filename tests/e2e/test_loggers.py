"""Any Lightning logger beside the CSV one: MLflow with a local store, as users add it."""

from __future__ import annotations

import sqlite3

import pytest

from e2e.command import QUIET, dgkit, interrupt, results, start, steps_logged, wait_for

pytest.importorskip("mlflow", reason="mlflow is in the test extras")


def test_mlflow_beside_csv_and_resume_and_report_still_work(tmp_path):
    args = ["fit", "--trainer.max_steps=400", "--model.backbone=mlp", "--last_checkpoint.every_n_steps=1000",
            "--trainer.logger+=MLFlowLogger", "--trainer.logger.init_args.tracking_uri=sqlite:///mlflow.db",
            "--trainer.logger.init_args.experiment_name=dgkit", *QUIET]
    proc = start(*args, cwd=tmp_path)
    run = tmp_path / "runs" / "version_0"
    wait_for(lambda: steps_logged(run) >= 30, what="training to pass step 30")
    code, _, err = interrupt(proc)
    assert code == 143, err[-3000:]
    resumed = dgkit(*args, cwd=tmp_path)
    assert resumed.code == 0, resumed.text[-3000:]
    assert "resuming the unfinished run" in resumed.err
    accuracy = results(run)["domains"]["75"]["accuracy"]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        keys = {k for (k,) in db.execute("select distinct key from metrics")}
        tested = db.execute("select value from metrics where key = 'test/accuracy/75'").fetchall()
    assert {"train/loss", "val/accuracy", "val/accuracy/0", "test/accuracy/75"} <= keys
    assert [round(v, 6) for (v,) in tested] == [round(accuracy, 6)]
