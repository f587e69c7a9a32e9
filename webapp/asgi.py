"""ASGI entry point (daphne): HTTP through Django (static files served by Django's staticfiles handler),
WebSockets through Channels with session authentication and an Origin check against ALLOWED_HOSTS."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

# Django must be set up before anything imports models (the consumers do).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from webapp.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        # No collectstatic, no extra package: files under static/ are served from STATIC_URL in any mode.
        "http": ASGIStaticFilesHandler(django_asgi_app),
        # The Origin check stops other sites from opening a user's stream with their session cookie.
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
