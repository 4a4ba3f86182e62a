"""A real S3-compatible server on 127.0.0.1 for the object-storage tests: moto in server mode.

moto's ``ThreadedMotoServer`` speaks the S3 REST protocol over a real socket, so
s3fs/botocore in this process, in a ``curate run`` subprocess and in its Ray
workers all talk to it exactly as they would to AWS or MinIO. Clients find it
through the standard variables (``AWS_ENDPOINT_URL``, honoured by botocore ≥ 1.31
and so by s3fs) — :meth:`S3Server.env` returns them for a subprocess.
"""

from __future__ import annotations

import logging

#: Not us-east-1: s3fs sends it as a LocationConstraint, which S3 (and moto) reject for that region.
REGION = "eu-west-1"
#: moto accepts any credentials; these are the values its documentation uses.
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION}


class S3Server:
    """Start with ``start()`` (returns self), stop with ``stop()``; ``endpoint`` is its base URL."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""

    def start(self) -> S3Server:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def env(self) -> dict[str, str]:
        """The variables a client process needs to use this server as its S3."""
        return {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_EC2_METADATA_DISABLED": "true"}  # never probe 169.254.169.254 for credentials

    def filesystem(self):
        """A fresh s3fs filesystem (no listing cache shared with other tests) on this server."""
        import s3fs

        return s3fs.S3FileSystem(key=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 secret=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], endpoint_url=self.endpoint,
                                 client_kwargs={"region_name": REGION},
                                 skip_instance_cache=True, use_listings_cache=False)
