"""Joining a Ray cluster that uses token authentication (Ray's default for clusters since 2.5x), as Ray's own CLI
does: the token comes from RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token. One quick RPC
before `ray.init` tells a cluster that refuses us from a slow or silent one, so a missing or wrong token is one line
instead of Ray's 20 seconds of retries."""

from __future__ import annotations

import os

import grpc

from cdm_dist.errors import InputError

AUTH_MODE = "RAY_AUTH_MODE"
PROBE_TIMEOUT_S = 10.0
HOW = (
    "set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on its head node), or RAY_AUTH_TOKEN_PATH to a "
    "file holding it (default ~/.ray/auth_token)"
)


def use_token_if_available() -> bool:
    """Token mode for this process when RAY_AUTH_MODE is unset and a token is found (what `ray.init()` does for an
    'auto' address and Ray's CLI for any); returns whether token mode is on."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _auth_metadata() -> list[tuple[str, str]]:
    """The gRPC metadata Ray's own clients send: the token header, when token mode is on and a token is found."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    if os.environ.get(AUTH_MODE, "").lower() != "token" or not loader.has_token():
        return []
    return list(loader.get_token_for_http_header().items())


def check_cluster_accepts(address: str, field: str) -> None:
    """The GCS at host:port answers a cluster-id request with our credentials; InputError naming RAY_AUTH_MODE and
    the token when it refuses them. A cluster that does not answer in time is left to `ray.init`."""
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    token_mode = use_token_if_available()
    target = address.split("://", 1)[-1].rstrip("/")
    with grpc.insecure_channel(target) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_TIMEOUT_S, metadata=_auth_metadata())
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                return
            why = "refused our token" if token_mode and _auth_metadata() else "needs a token and none was found"
            mode = "" if token_mode else f" ({AUTH_MODE}={os.environ.get(AUTH_MODE) or 'unset'})"
            raise InputError(
                f"{field}: the Ray cluster at {target} uses token authentication and {why}{mode}; {HOW}"
            ) from None
