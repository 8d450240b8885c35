"""SageMaker backend on plain boto3 (the sagemaker SDK is not needed).

Job names are deterministic (`uff-<run>-<hash>-sNNN`), so submitting is
idempotent: before `create_training_job` we `describe_training_job` the name,
and a "name already in use" answer also means "already submitted". All
sessions of a run share one `CheckpointConfig` S3 prefix: SageMaker restores
it into /opt/ml/checkpoints at every start (spot restart or next session),
which is how sessions chain.
"""

from __future__ import annotations

import re
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from uff_port.cloud.backends.base import (
    ProviderError,
    ProviderNotAvailable,
    ProviderUnavailable,
    RemoteStatus,
    SessionSpec,
)
from uff_port.cloud.backends.kaggle import run_hash
from uff_port.cloud.settings import SageMakerSettings

CHECKPOINT_LOCAL: Final = "/opt/ml/checkpoints"
_TRANSIENT_CODES: Final = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalServerError",
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
    }
)
_INTERRUPTING: Final = frozenset({"MaxRuntimeExceeded", "MaxWaitTimeExceeded", "Interrupted"})
ENTRYPOINT: Final = (
    "set -e; W=$(ls /opt/ml/input/data/bundle/uff_port-*.whl | tail -n1); "
    "python -c 'import uff_port' 2>/dev/null || pip install --no-index --no-deps -q \"$W\"; "
    "exec python -m uff_port.cloud.entry"
)


def job_name(run_id: str, index: int) -> str:
    """Deterministic, <= 63 chars, [a-zA-Z0-9-]: the submission's idempotency key."""
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", run_id).strip("-")[:40] or "run"
    return f"uff-{slug}-{run_hash(run_id)}-s{index:03d}"


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def classify(exc: BaseException) -> Exception:
    code = _error_code(exc)
    name = type(exc).__name__
    if code in _TRANSIENT_CODES or (not code and name != "ParamValidationError"):
        # Connection errors, timeouts and unknowns: we do not know the job's fate.
        return ProviderUnavailable(f"SageMaker unreachable: {name} {code}".strip())
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    if isinstance(status, int) and status >= 500:
        return ProviderUnavailable(f"SageMaker error {status}: {code}")
    return ProviderError(f"SageMaker refused: {code or name}: {str(exc)[:300]}")


def map_status(desc: dict[str, Any]) -> RemoteStatus:
    """TrainingJobStatus + SecondaryStatus -> our remote state."""
    primary = desc.get("TrainingJobStatus", "")
    secondary = desc.get("SecondaryStatus", "")
    reason = desc.get("FailureReason", "") or ""
    detail = f"{primary}/{secondary}" + (f": {reason}" if reason else "")
    billed = desc.get("BillableTimeInSeconds") or desc.get("TrainingTimeInSeconds")
    start = desc.get("TrainingStartTime")
    end = desc.get("TrainingEndTime")
    started = float(start.timestamp()) if start is not None and hasattr(start, "timestamp") else None
    ended = float(end.timestamp()) if end is not None and hasattr(end, "timestamp") else None
    billed_f = float(billed) if billed is not None else None
    if primary == "InProgress":
        # A spot interruption inside the job: SageMaker restarts it itself
        # from /opt/ml/checkpoints; nothing for us to do but keep polling.
        state = "queued" if secondary in ("Starting", "Pending", "LaunchingMLInstances") else "running"
        return RemoteStatus(state, detail, billed_f, started, ended)
    if primary == "Completed":
        return RemoteStatus("completed", detail, billed_f, started, ended)
    if primary in ("Stopping", "Stopped"):
        state = "interrupted" if secondary in _INTERRUPTING else "stopped"
        if primary == "Stopping":
            return RemoteStatus("running", detail, billed_f, started, ended)
        return RemoteStatus(state, detail, billed_f, started, ended)
    if primary == "Failed":
        state = "interrupted" if secondary in _INTERRUPTING or "MaxWaitTime" in reason else "failed"
        return RemoteStatus(state, detail, billed_f, started, ended)
    raise ProviderError(f"unknown TrainingJobStatus {primary!r}")


def _channel(name: str, uri: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
        },
        "InputMode": "File",
    }


def _split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ProviderError(f"not an s3:// uri: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


LOG_GROUP: Final = "/aws/sagemaker/TrainingJobs"
MAX_LOG_PAGES: Final = 20


class SageMakerBackend:
    name = "sagemaker"

    def __init__(
        self,
        sm: Any,
        s3: Any,
        settings: SageMakerSettings,
        run_id: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
        logs: Any = None,
    ) -> None:
        missing = [k for k in ("bucket", "role_arn", "image_uri") if not getattr(settings, k)]
        if missing:
            raise ProviderError("; ".join(f"cloud.sagemaker.{k}: required for the sagemaker backend" for k in missing))
        self.sm, self.s3, self.settings, self.run_id, self.sleep = sm, s3, settings, run_id, sleep
        self.logs = logs
        """A CloudWatch Logs client: the session's progress while it runs (None: none shown)."""
        self.prefix = f"{settings.prefix.strip('/')}/{run_hash(run_id)}"

    @property
    def checkpoint_uri(self) -> str:
        return f"s3://{self.settings.bucket}/{self.prefix}/checkpoints"

    def _call(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:
            raise classify(exc) from None

    @property
    def upload_args(self) -> dict[str, str] | None:
        """SSE-KMS for every object we write when a key is configured."""
        if not self.settings.kms_key_id:
            return None
        return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.settings.kms_key_id}

    def _put(self, path: Path, key: str) -> None:
        try:
            if self.upload_args:
                self.s3.upload_file(str(path), self.settings.bucket, key, ExtraArgs=self.upload_args)
            else:
                self.s3.upload_file(str(path), self.settings.bucket, key)
        except Exception as exc:
            raise classify(exc) from None

    def _exists(self, key: str) -> bool:
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.settings.bucket, Prefix=key):
                if any(obj["Key"] == key for obj in page.get("Contents", [])):
                    return True
        except Exception as exc:
            raise classify(exc) from None
        return False

    def _upload(self, spec: SessionSpec) -> str:
        key_prefix = f"{self.prefix}/sessions/{spec.name}/bundle"
        for path in sorted(p for p in spec.bundle_dir.rglob("*") if p.is_file()):
            self._put(path, f"{key_prefix}/{path.relative_to(spec.bundle_dir).as_posix()}")
        return f"s3://{self.settings.bucket}/{key_prefix}/"

    def weights_uri(self, weights: dict[str, Any] | None) -> str | None:
        """The `model` channel: model_s3_uri, or the local copy's content-addressed prefix (any run reuses it)."""
        if not weights or weights.get("kind") != "s3":
            return None
        if weights.get("source"):
            return str(weights["source"])
        return f"s3://{self.settings.bucket}/{self.settings.prefix.strip('/')}/weights/{weights['content_hash']}/"

    def corpus_uri(self, corpus: dict[str, Any] | None) -> str | None:
        """Content-addressed: every job of every run training on the same bytes (and key) shares it."""
        if not corpus:
            return None
        return f"s3://{self.settings.bucket}/{self.settings.prefix.strip('/')}/corpus/{corpus['address']}/"

    def _upload_corpus(self, corpus: dict[str, Any]) -> None:
        from uff_port.cloud.corpus import CORPUS_MARKER

        uri = self.corpus_uri(corpus)
        assert uri is not None
        _bucket, prefix = _split_s3(uri)
        if self._exists(prefix + CORPUS_MARKER):
            return
        piece = Path(str(corpus["path"]))
        for name in corpus["files"]:
            self._put(piece / name, prefix + name)
        self._put(piece / CORPUS_MARKER, prefix + CORPUS_MARKER)  # last: its presence means complete

    def _upload_weights(self, weights: dict[str, Any]) -> None:
        """Once per content hash: the marker is written last, so its presence means a complete copy."""
        from uff_port.cloud.weights import WEIGHTS_MARKER, WeightsPlan, write_marker

        if weights.get("source") or not weights.get("local_dir"):
            return
        uri = self.weights_uri(weights)
        assert uri is not None
        _bucket, prefix = _split_s3(uri)
        if self._exists(prefix + WEIGHTS_MARKER):
            return
        local = Path(str(weights["local_dir"]))
        for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != WEIGHTS_MARKER):
            self._put(path, prefix + path.relative_to(local).as_posix())
        with tempfile.TemporaryDirectory() as tmp:
            write_marker(Path(tmp), WeightsPlan("s3", str(weights["name"]), content_hash=str(weights["content_hash"])))
            self._put(Path(tmp) / WEIGHTS_MARKER, prefix + WEIGHTS_MARKER)

    def request(self, spec: SessionSpec, bundle_uri: str) -> dict[str, Any]:
        st = self.settings
        stopping: dict[str, int] = {"MaxRuntimeInSeconds": int(spec.budget_seconds)}
        if st.use_spot:
            stopping["MaxWaitTimeInSeconds"] = int(st.max_wait_seconds or 2 * spec.budget_seconds)
        req = self._request(spec, bundle_uri, stopping)
        weights = spec.extra.get("weights")
        model_uri = self.weights_uri(weights)
        if model_uri is not None:
            req["InputDataConfig"].append(_channel("model", model_uri))
        corpus = spec.extra.get("corpus")
        corpus_uri = self.corpus_uri(corpus)
        if corpus_uri is not None:
            req["InputDataConfig"].append(_channel("corpus", corpus_uri))
        if corpus and corpus.get("sagemaker_secret_id"):
            # The job reads the key from Secrets Manager itself: only its name travels.
            req["HyperParameters"]["uff_corpus_secret"] = str(corpus["sagemaker_secret_id"])
        elif st.network_isolation and weights and weights.get("kind") == "hub":
            raise ProviderError("cloud.sagemaker.network_isolation: the job cannot reach the Hub; set cloud.sagemaker.model_s3_uri")
        if st.network_isolation:
            req["EnableNetworkIsolation"] = True
        if st.kms_key_id:
            req["OutputDataConfig"]["KmsKeyId"] = st.kms_key_id
            req["ResourceConfig"]["VolumeKmsKeyId"] = st.kms_key_id
        if st.subnets:
            req["VpcConfig"] = {"Subnets": list(st.subnets), "SecurityGroupIds": list(st.security_group_ids)}
        return req

    def _request(self, spec: SessionSpec, bundle_uri: str, stopping: dict[str, int]) -> dict[str, Any]:
        st = self.settings
        return {
            "TrainingJobName": spec.name,
            "AlgorithmSpecification": {
                "TrainingImage": st.image_uri,
                "TrainingInputMode": "File",
                "ContainerEntrypoint": ["/bin/sh", "-c", ENTRYPOINT],
            },
            "RoleArn": st.role_arn,
            "InputDataConfig": [_channel("bundle", bundle_uri)],
            "OutputDataConfig": {"S3OutputPath": f"s3://{st.bucket}/{self.prefix}/output"},
            "ResourceConfig": {"InstanceType": st.instance_type, "InstanceCount": st.instance_count, "VolumeSizeInGB": 50},
            "StoppingCondition": stopping,
            "EnableManagedSpotTraining": st.use_spot,
            "CheckpointConfig": {"S3Uri": self.checkpoint_uri, "LocalPath": CHECKPOINT_LOCAL},
            "HyperParameters": {
                "uff_max_runtime": str(int(spec.budget_seconds)),
                "uff_margin": str(int(spec.margin_seconds)),
                "uff_session": spec.name,
            },
            "Tags": [{"Key": "uff-port-run", "Value": run_hash(self.run_id)}],
        }

    def find(self, spec: SessionSpec) -> str | None:
        try:
            self.sm.describe_training_job(TrainingJobName=spec.name)
        except Exception as exc:
            err = classify(exc)
            if isinstance(err, ProviderError):
                return None  # "Requested resource not found": never submitted
            raise err from None
        return spec.name

    def submit(self, spec: SessionSpec) -> str:
        weights = spec.extra.get("weights")
        if weights:
            self._upload_weights(weights)
        if spec.extra.get("corpus"):
            self._upload_corpus(spec.extra["corpus"])
        bundle_uri = self._upload(spec)
        try:
            self.sm.create_training_job(**self.request(spec, bundle_uri))
        except Exception as exc:
            if _error_code(exc) in ("ResourceInUse", "ResourceInUseException") or "must be unique" in str(exc):
                return spec.name  # a previous attempt got through: same job, not a new one
            raise classify(exc) from None
        return spec.name

    def status(self, ref: str) -> RemoteStatus:
        return map_status(self._call(self.sm.describe_training_job, TrainingJobName=ref))

    def stop(self, ref: str) -> None:
        # SageMaker sends SIGTERM; the entry point checkpoints within 120 s.
        self._call(self.sm.stop_training_job, TrainingJobName=ref)

    def live_events(self, ref: str, cursor: dict[str, Any]) -> list[dict[str, Any]]:
        """Events the session's entry echoed into its CloudWatch log since `cursor` (updated in place).

        SageMaker writes a training job's stdout to the log group /aws/sagemaker/TrainingJobs,
        one stream per host (`<job>/algo-1-<epoch>`); only the first host's trainer reports.
        Best effort: a log not there yet, or any error, yields nothing this time.
        """
        from uff_port.cloud.entry import parse_live_line

        if self.logs is None:
            return []
        out: list[dict[str, Any]] = []
        try:
            streams = self.logs.describe_log_streams(
                logGroupName=LOG_GROUP, logStreamNamePrefix=f"{ref}/algo-1-", limit=5
            ).get("logStreams", [])
            for stream in sorted(streams, key=lambda s: str(s.get("logStreamName")))[:1]:
                name = str(stream["logStreamName"])
                for _ in range(MAX_LOG_PAGES):
                    kwargs: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamName": name, "startFromHead": True}
                    if cursor.get(name):
                        kwargs["nextToken"] = cursor[name]
                    page = self.logs.get_log_events(**kwargs)
                    for item in page.get("events", []):
                        ev = parse_live_line(str(item.get("message", "")))
                        if ev is not None:
                            out.append(ev)
                    token = page.get("nextForwardToken")
                    if not token or token == cursor.get(name):
                        break  # the same token again: the end of the stream for now
                    cursor[name] = token
        except Exception:  # noqa: BLE001 - progress display only; status() reports real trouble
            return out
        return out

    def pull(self, ref: str, dest: Path) -> None:
        """model.tar.gz (the verified output) into dest; the S3 checkpoints beside it."""
        from uff_port.cloud.entry import safe_extract

        desc = self._call(self.sm.describe_training_job, TrainingJobName=ref)
        uri = (desc.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
        if not uri:
            raise ProviderError(f"{ref}: no model artifacts")
        bucket, key = _split_s3(uri)
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "model.tar.gz"
            try:
                self.s3.download_file(bucket, key, str(archive))
            except Exception as exc:
                raise classify(exc) from None
            try:
                safe_extract(archive, dest)
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise ProviderError(f"{ref}: model.tar.gz is damaged: {exc}") from None
        self._download_prefix(f"{self.prefix}/checkpoints/", dest.with_name(dest.name + ".s3-checkpoints"))

    def _download_prefix(self, prefix: str, dest: Path) -> None:
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.settings.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) :]
                    if not rel or ".." in Path(rel).parts:
                        continue
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self.s3.download_file(self.settings.bucket, obj["Key"], str(target))
        except Exception as exc:
            raise classify(exc) from None


def load_clients(settings: SageMakerSettings) -> tuple[Any, Any, Any]:
    """boto3 clients from the usual AWS chain (env, profiles, roles); never logged."""
    try:
        import boto3
    except ImportError as exc:
        raise ProviderNotAvailable("boto3 is not installed: pip install 'uff-port[cloud]'") from exc
    from uff_port.cloud.settings import aws_region

    region = aws_region(settings)
    if region is None:
        raise ProviderError("cloud.sagemaker.region: required for the sagemaker backend (or set AWS_REGION)")
    session = boto3.session.Session(region_name=region)
    return session.client("sagemaker"), session.client("s3"), session.client("logs")
