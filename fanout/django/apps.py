from django.apps import AppConfig


class FanoutConfig(AppConfig):
    """``INSTALLED_APPS = [..., "fanout.django"]``: the outbox table (migration) and ``fanout_relay``."""

    name = "fanout.django"
    label = "fanout"
    verbose_name = "fanout"
    default_auto_field = "django.db.models.BigAutoField"
