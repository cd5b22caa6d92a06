"""Kubernetes service-account tokens, checked by the API server (``TokenReview``).

The control plane needs RBAC permission to create ``tokenreviews`` (the ``system:auth-delegator``
ClusterRole grants it).
"""

from __future__ import annotations

from collections.abc import Sequence

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from control_plane.ca.auth import ReviewUnavailable, TokenReview

DEFAULT_AUDIENCE = "pilotfish-ca"


class KubeTokenReviewer:
    """``TokenReviewer`` through the API server; ``ReviewUnavailable`` when it cannot answer."""

    def __init__(self, api: client.ApiClient, timeout: float = 10.0) -> None:
        self._api = client.AuthenticationV1Api(api)
        self._timeout = timeout

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReview:
        body = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=list(audiences) or None)
        )
        try:
            result = await self._api.create_token_review(body, _request_timeout=self._timeout)
        except ApiException as exc:
            raise ReviewUnavailable(f"TokenReview failed: {exc.status} {exc.reason}") from None
        except (OSError, TimeoutError) as exc:
            raise ReviewUnavailable(f"TokenReview failed: {exc}") from None
        status = result.status
        if status is None:
            raise ReviewUnavailable("TokenReview answered without a status")
        user = status.user
        return TokenReview(
            authenticated=bool(status.authenticated),
            username=(user.username or "") if user is not None else "",
            audiences=tuple(status.audiences or ()),
            error=status.error or "",
        )
