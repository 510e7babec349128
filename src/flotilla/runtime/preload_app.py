"""Imported by a device's fork server: preloads the user's ClientApp module (see flotilla.runtime.preload)."""

from flotilla.runtime.preload import preload

preload()
