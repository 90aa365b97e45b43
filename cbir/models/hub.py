"""Pretrained weights from the Hugging Face hub, for users with internet, with a one-line reason
when it cannot be reached."""
from __future__ import annotations

import logging
import urllib.parse
import urllib.request
from contextlib import contextmanager, nullcontext

import timm
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import get_session
from torch import nn

from cbir.errors import ModelError, in_one_line
from cbir.models.registry import Backbone

# Long enough for a slow link's handshake; short against the hub's ~50 s of retries.
HUB_CONNECT_TIMEOUT_S = 3.0


# A proxy's own answers when it cannot reach the hub, or will not without credentials.
_PROXY_FAILURES = (407, 502, 504)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception under ``exc``: the network's own words under a library's."""
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    return exc


def _hub_proxy(endpoint: str) -> str | None:
    """The proxy the environment names for ``endpoint``, without credentials; None if none."""
    url = urllib.parse.urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(url.hostname or ""):
        return None
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here, or None.

    Without a network the hub retries each weights file five times (about 50 s in all) before it
    gives up. One HEAD request to its endpoint through the hub's own HTTP client, so through the
    proxy the hub would use, tells in seconds: no resolver, a name that does not resolve, a
    refused connection, a firewall that drops it, a proxy that refuses the tunnel, cannot reach
    the hub or wants credentials. Any answer of the hub itself, whatever its status, means it is
    there.
    """
    if hub_constants.HF_HUB_OFFLINE:
        return None
    endpoint = hub_constants.ENDPOINT
    proxy = _hub_proxy(endpoint)
    where = endpoint + (f" through the proxy {proxy}" if proxy else "")
    try:
        response = get_session().head(endpoint, timeout=HUB_CONNECT_TIMEOUT_S, follow_redirects=False)
    except Exception as exc:  # the client's errors, and whatever a client factory of the user's raises
        return f"{in_one_line(_root_cause(exc))} ({where})"
    if proxy and response.status_code in _PROXY_FAILURES:
        return f"the proxy answered {response.status_code} {response.reason_phrase} ({where})"
    return None


@contextmanager
def _hub_offline():
    """The hub answers from its local cache alone, as with ``HF_HUB_OFFLINE=1``."""
    offline = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True  # the environment variable is read once, at import
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = offline


def download_pretrained(backbone: Backbone, input_size: int) -> nn.Module:
    """timm's ImageNet-pretrained ``backbone``, from the Hugging Face Hub or its cache.

    Where the hub cannot be reached, only the cache is asked, so the error comes at once.
    """
    unreachable = _hub_unreachable()
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its line per retry; the reason is in our one line
    try:
        with _hub_offline() if unreachable else nullcontext():
            return timm.create_model(backbone.timm_name, pretrained=True, num_classes=0,
                                     **({"img_size": input_size} if backbone.fixed_input_size else {}))
    except Exception as exc:
        reason = _root_cause(exc)
        words = in_one_line(reason)
        if unreachable and isinstance(reason, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            words = unreachable  # not in the cache; why the hub was not asked says more
        raise ModelError(f"cannot get ImageNet weights for {backbone.name} from the Hugging Face Hub or its cache "
                         f"({words}); without internet pass --weights FILE, or use "
                         "efficientnet_lite0 (packaged weights)") from exc
    finally:
        hub_log.setLevel(level)

