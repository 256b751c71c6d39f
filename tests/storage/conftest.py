"""A real S3 API on 127.0.0.1: moto's server (threaded, in this process) on a free port, with fake
credentials in the environment, as every AWS client reads them. Tests that need it skip, saying why,
when moto is not installed (`pip install 'moto[server]'`, part of the dev extra)."""

import os
import uuid
from collections.abc import Iterator

import pytest

from llmtrain.config.storage import StorageConfig
from llmtrain.launch.local import free_port

SECRET = "llmtrain-test-secret-" + uuid.uuid4().hex
"""The fake secret key: the tests grep logs, configs, checkpoints and MLflow for it."""
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "llmtrain-test-key-id",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """moto's S3 server; stop() takes it down (connections refused) and start() brings it back with the
    same buckets and objects (moto keeps its state in this process)."""

    def __init__(self, port: int) -> None:
        from moto.server import ThreadedMotoServer

        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self._cls, self._server = ThreadedMotoServer, None

    def start(self) -> None:
        self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def bucket(self) -> str:
        """A new, empty bucket."""
        name = f"llmtrain-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'llmtrain[s3]')")
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    server = S3Server(free_port())
    server.start()
    from llmtrain.data import objstore

    objstore.configure(StorageConfig(endpoint_url=server.url))
    yield server
    server.stop()
    objstore.configure(StorageConfig())
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _s3_endpoint(request: pytest.FixtureRequest) -> None:
    """Tests using the server read s3:// through it, whatever endpoint an earlier Trainer configured."""
    if "s3" in request.fixturenames:
        from llmtrain.data import objstore

        objstore.configure(StorageConfig(endpoint_url=request.getfixturevalue("s3").url))


def upload_folder(server: S3Server, local, bucket: str, prefix: str) -> str:
    """Copy a local folder tree to s3://bucket/prefix; returns the URI."""
    client = server.client()
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local)}")
    return f"s3://{bucket}/{prefix}"
