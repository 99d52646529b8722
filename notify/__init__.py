"""Alerts that leave the page: webhook, syslog and e-mail destinations behind a delivery stage."""

from notify.notifier import Notifier, NotifySettings

__all__ = ["Notifier", "NotifySettings"]
