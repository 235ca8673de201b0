"""The clinicians' web viewer, served by the gateway at /viewer/ (server-rendered Jinja2, no build step, no CDN).

`build_router(gateway, settings)` returns the FastAPI router the gateway's app mounts. Every prediction goes
through `Gateway.predict` (the same authentication, limits, audit and request log as the gRPC and REST doors), with
`explain=True` so the SavedModel's `explain` signature supplies the Grad-CAM heat map.
"""

from serving.viewer.app import ViewerSettings, build_router

__all__ = ["ViewerSettings", "build_router"]
