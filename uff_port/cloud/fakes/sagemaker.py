"""Stand-ins for the boto3 SageMaker and S3 clients (see uff_port.cloud.fakes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from uff_port.cloud.fakes.kaggle import FAKE_ENV, FakeConnectionError, FakeKaggleApi, kill_tree
from uff_port.fsutil import atomic_write_json


class FakeS3:
    """The slice of the boto3 S3 client the backend uses, on a local directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / key

    def upload_file(self, Filename: str, Bucket: str, Key: str, ExtraArgs: Any = None) -> None:  # noqa: N803
        from boto3.s3.transfer import S3Transfer

        bad = sorted(set(ExtraArgs or {}) - set(S3Transfer.ALLOWED_UPLOAD_ARGS))
        if bad:
            raise ValueError(f"Invalid extra_args key {bad[0]!r}, must be one of: {S3Transfer.ALLOWED_UPLOAD_ARGS}")
        if ExtraArgs and ExtraArgs.get("ServerSideEncryption") not in (None, "AES256", "aws:kms", "aws:kms:dsse"):
            raise _client_error("InvalidArgument", "The encryption method specified is not supported", "PutObject")
        dest = self._path(Bucket, Key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Filename, dest)

    def download_file(self, Bucket: str, Key: str, Filename: str, ExtraArgs: Any = None) -> None:  # noqa: N803
        src = self._path(Bucket, Key)
        if not src.is_file():
            raise _client_error("404", "Not Found", "HeadObject")
        shutil.copyfile(src, Filename)

    def get_paginator(self, name: str) -> Any:
        assert name == "list_objects_v2"
        s3 = self

        class _Pages:
            def paginate(self, Bucket: str, Prefix: str = "") -> Any:  # noqa: N803
                base = s3.root / Bucket
                keys = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()) if base.exists() else []
                keys = [k for k in keys if k.startswith(Prefix)]
                for i in range(0, max(len(keys), 1), 2):
                    yield {"Contents": [{"Key": k} for k in keys[i : i + 2]]}

        return _Pages()


def _client_error(code: str, message: str, op: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, op)


class FakeSageMakerClient:
    """Training jobs that play a script instead of training (fast life-cycle tests).

    `faults.json` keys: `sm_script` = [[seconds, TrainingJobStatus, SecondaryStatus], ...]
    (default: 2 s InProgress/Training, then Completed/Completed), `sm_steps` = steps
    one session advances, `describe_errors` = N transient failures, `outage`.
    A terminal job leaves a model.tar.gz with a verified manifest, as the entry does.
    """

    def __init__(
        self, state_dir: str | Path, s3: FakeS3, clock: Callable[[], float] = time.time, grace: float = 120.0
    ) -> None:
        self.root = Path(state_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.s3 = s3
        self.clock = clock
        self.grace = grace
        """Seconds between SageMaker's SIGTERM and its kill (real: 120)."""
        self.kaggle_like = FakeKaggleApi(self.root, clock)  # shares faults.json handling

    def _faults(self) -> dict[str, Any]:
        try:
            return self.kaggle_like._enter("sagemaker")
        except FakeConnectionError:
            from botocore.exceptions import EndpointConnectionError

            raise EndpointConnectionError(endpoint_url="https://api.sagemaker.fake") from None

    def _job(self, name: str) -> Path:
        return self.root / "jobs" / f"{name}.json"

    def creations(self) -> list[str]:
        log = self.root / "creations.log"
        return log.read_text(encoding="utf-8").split() if log.exists() else []

    def create_training_job(self, **req: Any) -> dict[str, Any]:
        self._faults()
        validate_request("CreateTrainingJob", req)
        path = self._job(req["TrainingJobName"])
        if path.exists():
            raise _client_error("ResourceInUse", "Training job names must be unique within an AWS account and region", "CreateTrainingJob")
        path.parent.mkdir(parents=True, exist_ok=True)
        job: dict[str, Any] = {"request": req, "created": self.clock(), "stopped": None, "produced": False}
        if self.kaggle_like._faults().get("sm_real"):
            job["real"] = self._launch(req)
        atomic_write_json(path, job)
        with open(self.root / "creations.log", "a", encoding="utf-8") as fh:
            fh.write(req["TrainingJobName"] + "\n")
        return {"TrainingJobArn": f"arn:aws:sagemaker:fake:0:training-job/{req['TrainingJobName']}"}

    def stop_training_job(self, TrainingJobName: str) -> None:  # noqa: N803
        self._faults()
        path = self._job(TrainingJobName)
        job = json.loads(path.read_text(encoding="utf-8"))
        job["stopped"] = job["stopped"] or self.clock()
        atomic_write_json(path, job)

    def describe_training_job(self, TrainingJobName: str) -> dict[str, Any]:  # noqa: N803
        faults = self._faults()
        if faults.get("describe_errors", 0) > 0:
            self.kaggle_like.set_faults(describe_errors=faults["describe_errors"] - 1)
            raise _client_error("ThrottlingException", "Rate exceeded", "DescribeTrainingJob")
        path = self._job(TrainingJobName)
        if not path.exists():
            raise _client_error("ValidationException", "Requested resource not found.", "DescribeTrainingJob")
        job = json.loads(path.read_text(encoding="utf-8"))
        if job.get("real"):
            return self._describe_real(path, job, TrainingJobName)
        script = faults.get("sm_script") or [[2.0, "InProgress", "Training"], [0.0, "Completed", "Completed"]]
        elapsed = self.clock() - job["created"]
        primary, secondary, t = script[-1][1], script[-1][2], 0.0
        for seconds, p, s in script:
            if elapsed < t + seconds:
                primary, secondary = p, s
                break
            t += seconds
        if job["stopped"] is not None and primary == "InProgress":
            primary, secondary = "Stopped", "Stopped"
        req = job["request"]
        desc: dict[str, Any] = {
            "TrainingJobName": TrainingJobName,
            "TrainingJobStatus": primary,
            "SecondaryStatus": secondary,
        }
        if primary in ("Completed", "Stopped", "Failed"):
            if not job["produced"]:
                self._produce(req, int(faults.get("sm_steps", 5)), primary)
                job["produced"] = True
                atomic_write_json(path, job)
            ran = sum(seconds for seconds, _, _ in script[:-1]) if job["stopped"] is None else job["stopped"] - job["created"]
            desc["TrainingTimeInSeconds"] = int(min(elapsed, ran, req["StoppingCondition"]["MaxRuntimeInSeconds"]))
            desc["BillableTimeInSeconds"] = desc["TrainingTimeInSeconds"]
            out = req["OutputDataConfig"]["S3OutputPath"]
            desc["ModelArtifacts"] = {"S3ModelArtifacts": f"{out}/{TrainingJobName}/output/model.tar.gz"}
        return desc

    def _launch(self, req: dict[str, Any]) -> dict[str, Any]:
        """Run the real entry point as the training container would (sm_real mode)."""
        name = req["TrainingJobName"]
        jobroot = self.root / "containers" / name
        channels: dict[str, str] = {}
        for channel in req["InputDataConfig"]:
            # Each channel's S3 prefix lands in /opt/ml/input/data/<name> (File mode).
            local = jobroot / "input" / "data" / channel["ChannelName"]
            local.mkdir(parents=True)
            channels[f"SM_CHANNEL_{channel['ChannelName'].upper()}"] = str(local)
            c_bucket, _, c_prefix = channel["DataSource"]["S3DataSource"]["S3Uri"][5:].partition("/")
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=c_bucket, Prefix=c_prefix):
                for obj in page.get("Contents", []):
                    target = local / obj["Key"][len(c_prefix) :].lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self.s3.download_file(c_bucket, obj["Key"], str(target))
        # CheckpointConfig: one directory per S3 prefix stands in for the sync.
        shared = self.root / "checkpoint-sync" / hashlib_hex(req["CheckpointConfig"]["S3Uri"])
        shared.mkdir(parents=True, exist_ok=True)
        (jobroot / "checkpoints").symlink_to(shared, target_is_directory=True)
        (jobroot / "model").mkdir()
        env = {k: v for k, v in os.environ.items() if k != FAKE_ENV and not k.startswith("SM_")}
        env.update(
            {
                "UFF_PORT_SM_ROOT": str(jobroot),
                "SM_MODEL_DIR": str(jobroot / "model"),
                **channels,
                "SM_HPS": json.dumps(req.get("HyperParameters", {})),
                "UFF_PORT_KILL_AFTER": str(self.grace),
            }
        )
        with open(jobroot / "log.txt", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", _SM_WRAPPER, str(jobroot / "rc")],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return {"pid": proc.pid, "root": str(jobroot), "started": time.time(), "term": None, "cause": None}


    def _describe_real(self, path: Path, job: dict[str, Any], name: str) -> dict[str, Any]:
        import tarfile

        real = job["real"]
        root = Path(real["root"])
        req = job["request"]
        now = time.time()
        rc_file = root / "rc"
        if not rc_file.exists():
            try:
                os.waitpid(real["pid"], os.WNOHANG)
            except ChildProcessError:
                pass
            limit = req["StoppingCondition"]["MaxRuntimeInSeconds"]
            cause = "MaxRuntimeExceeded" if now - real["started"] > limit else "Stopped" if job["stopped"] else None
            if cause and real["term"] is None and (root / "rc.pid").exists():
                # SIGTERM to the container's main process, the kill follows after the grace.
                os.kill(int((root / "rc.pid").read_text()), signal.SIGTERM)
                real.update(term=now, cause=cause)
                atomic_write_json(path, job)
            elif real["term"] is not None and now - real["term"] > self.grace:
                kill_tree(real["pid"])
                rc_file.write_text("-9")
            if not rc_file.exists():
                return {"TrainingJobName": name, "TrainingJobStatus": "InProgress" if real["term"] is None else "Stopping",
                        "SecondaryStatus": "Training" if real["term"] is None else "Stopping"}
        rc = int(rc_file.read_text() or "1")
        if real["cause"] is not None:
            primary, secondary = "Stopped", real["cause"]
        else:
            primary, secondary = ("Completed", "Completed") if rc == 0 else ("Failed", "Failed")
        if "ended" not in real:
            real["ended"] = now
            model = root / "model"
            archive = root / "model.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                for item in sorted(model.iterdir()):
                    tar.add(item, arcname=item.name)
            out_bucket, _, out_prefix = req["OutputDataConfig"]["S3OutputPath"][5:].partition("/")
            self.s3.upload_file(str(archive), out_bucket, f"{out_prefix}/{name}/output/model.tar.gz")
            atomic_write_json(path, job)
        out = req["OutputDataConfig"]["S3OutputPath"]
        seconds = int(real["ended"] - real["started"])
        return {
            "TrainingJobName": name,
            "TrainingJobStatus": primary,
            "SecondaryStatus": secondary,
            "FailureReason": "" if rc == 0 else f"AlgorithmError: exit {rc}",
            "TrainingTimeInSeconds": seconds,
            "BillableTimeInSeconds": seconds,
            "ModelArtifacts": {"S3ModelArtifacts": f"{out}/{name}/output/model.tar.gz"},
        }

    def _produce(self, req: dict[str, Any], steps: int, primary: str) -> None:
        """What the entry point leaves: checkpoint synced to S3, model.tar.gz with a manifest."""
        import tarfile
        import tempfile

        import yaml

        from uff_port.cloud.verify import write_output_manifest
        from uff_port.core.checkpoint_store import CheckpointStore

        bucket, _, ck_prefix = req["CheckpointConfig"]["S3Uri"][5:].partition("/")
        bundle_bucket, _, bundle_prefix = req["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"][5:].partition("/")
        with tempfile.TemporaryDirectory() as tmp:
            self.s3.download_file(bundle_bucket, bundle_prefix.rstrip("/") + "/config.yaml", f"{tmp}/c.yaml")
            cfg = yaml.safe_load(Path(f"{tmp}/c.yaml").read_text(encoding="utf-8"))
        max_steps = int(cfg["training"]["max_steps"])
        prev = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=ck_prefix + "/run/checkpoints/"):
            for obj in page.get("Contents", []):
                part = obj["Key"][len(ck_prefix) + len("/run/checkpoints/") :].split("/")[0]
                if part.startswith("step-"):
                    prev = max(prev, int(part[5:]))
        step = min(max_steps, prev + (steps if primary != "Failed" else 0))
        finished = step >= max_steps
        name = f"step-{step:08d}"
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "model"
            run = model / "run"
            # Committed the way the trainer commits (manifest with format and hashes, LATEST).
            store = CheckpointStore(run)
            staging = store.begin(step)
            (staging / "adapter_model.safetensors").write_bytes(f"weights@{step}".encode() * 64)
            store.commit(staging, step, {})
            if finished:
                (run / "final").mkdir()
                (run / "final" / "adapter_model.safetensors").write_bytes(f"final@{step}".encode() * 64)
            (run / "session.json").write_text(json.dumps({"session": req["TrainingJobName"], "step": step, "finished": finished, "rc": 0}))
            write_output_manifest(model, session=req["TrainingJobName"], step=step, finished=finished)
            if step > prev:
                # What CheckpointConfig syncs from /opt/ml/checkpoints.
                for f in sorted((run / "checkpoints" / name).iterdir()):
                    self.s3.upload_file(str(f), bucket, f"{ck_prefix}/run/checkpoints/{name}/{f.name}")
            archive = Path(tmp) / "model.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                for item in sorted(model.iterdir()):
                    tar.add(item, arcname=item.name)
            out = req["OutputDataConfig"]["S3OutputPath"][5:]
            ob, _, op = out.partition("/")
            self.s3.upload_file(str(archive), ob, f"{op}/{req['TrainingJobName']}/output/model.tar.gz")


class FakeLogs:
    """The slice of the CloudWatch Logs client the backend reads: a training job's log stream.

    A job started in `sm_real` mode writes its container's stdout to `containers/<job>/log.txt`;
    that file is the stream `<job>/algo-1-<start epoch>` of /aws/sagemaker/TrainingJobs. Requests
    are checked with botocore's own validator; tokens are opaque, as the real ones are.
    """

    PAGE_LINES: Final = 50  # small pages, so readers must follow nextForwardToken

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)

    def _streams(self) -> dict[str, Path]:
        out = {}
        for log in sorted((self.root / "containers").glob("*/log.txt")):
            out[f"{log.parent.name}/algo-1-{int(log.stat().st_ctime)}"] = log
        return out

    def describe_log_streams(self, **req: Any) -> dict[str, Any]:
        validate_request("DescribeLogStreams", req, service="logs")
        if req["logGroupName"] != "/aws/sagemaker/TrainingJobs":
            raise _client_error("ResourceNotFoundException", "The specified log group does not exist.", "DescribeLogStreams")
        prefix = req.get("logStreamNamePrefix", "")
        names = [n for n in self._streams() if n.startswith(prefix)][: req.get("limit", 50)]
        return {"logStreams": [{"logStreamName": n} for n in names]}

    def get_log_events(self, **req: Any) -> dict[str, Any]:
        validate_request("GetLogEvents", req, service="logs")
        log = self._streams().get(req["logStreamName"])
        if log is None or req["logGroupName"] != "/aws/sagemaker/TrainingJobs":
            raise _client_error("ResourceNotFoundException", "The specified log stream does not exist.", "GetLogEvents")
        token = req.get("nextToken") or "f/0"
        if not token.startswith("f/") or not token[2:].isdigit():
            raise _client_error("InvalidParameterException", "The specified nextToken is invalid.", "GetLogEvents")
        offset = int(token[2:])
        with open(log, "rb") as fh:
            fh.seek(offset)
            data = fh.read(1 << 20)
        lines = data.split(b"\n")[:-1][: self.PAGE_LINES]  # whole lines only, as CloudWatch ingests them
        offset += sum(len(line) + 1 for line in lines)
        now = int(time.time() * 1000)
        events = [{"timestamp": now, "message": line.decode("utf-8", "replace"), "ingestionTime": now} for line in lines]
        return {"events": events, "nextForwardToken": f"f/{offset}", "nextBackwardToken": "b/0"}


_SM_WRAPPER: Final = (
    "import os, signal, subprocess, sys\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "p = subprocess.Popen([sys.executable, '-m', 'uff_port.cloud.entry'],"
    " preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))\n"
    "open(sys.argv[1] + '.pid', 'w').write(str(p.pid))\n"
    "rc = p.wait()\n"
    "open(sys.argv[1] + '.tmp', 'w').write(str(rc))\n"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
)


def validate_request(operation: str, params: dict[str, Any], service: str = "sagemaker") -> None:
    """botocore's own parameter validation against the service's model, as the real client does."""
    import botocore.session
    from botocore.exceptions import ParamValidationError
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model(service).operation_model(operation)
    report = ParamValidator().validate(params, model.input_shape)
    if report.has_errors():
        raise ParamValidationError(report=report.generate_report())


def hashlib_hex(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


