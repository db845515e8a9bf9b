"""detectron2 as a second detector backend (``backend: detectron2``): the paper's own RetinaNet, Faster R-CNN and
Mask R-CNN, built from detectron2's model-zoo configs, behind the same seam as torchvision's detectors.

detectron2 publishes no wheels; it is built from source (see ``INSTALL``). Nothing here imports it at module
import: ``require()`` does, and says how to install it when it is missing. ``config`` builds the CfgNode,
``adapter`` holds the adapters.
"""
from __future__ import annotations

COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"  # facebookresearch/detectron2, the commit we build and test
VENDORED = "../shared/vendor/detectron2-02b5c4e2.tar.gz"  # the same commit as a source tarball (no network)
INSTALL = (f"pip install --no-build-isolation 'detectron2 @ git+https://github.com/facebookresearch/detectron2@{COMMIT}'"
           f" (without network, from the repository root: MAX_JOBS=2 pip install --no-build-isolation {VENDORED}); "
           f"torch first, then ~3 min of C++ build on 2 cores")


class Detectron2Missing(ImportError):
    """detectron2 (or its compiled ops) cannot be imported; the message names the install command."""


def require() -> None:
    """Import detectron2 and its compiled ops, or raise :class:`Detectron2Missing` naming the install command."""
    try:
        import detectron2  # noqa: F401
        from detectron2 import _C  # noqa: F401  (a source checkout that was never built has no _C)
    except ImportError as e:
        raise Detectron2Missing(f"backend detectron2 needs detectron2, which cannot be imported ({e}); install it: "
                                f"{INSTALL}") from e


def available() -> bool:
    try:
        require()
    except Detectron2Missing:
        return False
    return True


def option_problems(detector: str, options: dict) -> list[tuple[str, str]]:
    """``detector_options`` of backend detectron2 that are not valid: (key, message) for each key that is not a
    detectron2 config key of ``detector``'s model-zoo config, that the trial config sets itself, or whose value
    has the wrong type."""
    if not options:
        return []
    try:
        require()
    except Detectron2Missing as e:
        return [(next(iter(options)), f"cannot be checked: {e}")]
    from lgd.detectors.detectron2.config import option_problems as problems

    return problems(detector, options)


def build_detector(detector: str, backbone: str, num_classes: int, min_sizes: tuple[int, ...], max_size: int,
                   weights: str | None = None, channels: int = 256, options: dict | None = None):
    """detectron2's ``detector`` with ``backbone``-FPN, wrapped in its adapter; ``num_classes`` counts the
    background (K + 1), as for torchvision."""
    require()
    from lgd.detectors.detectron2.adapter import build

    return build(detector, backbone, num_classes, min_sizes, max_size, weights, channels, options)
