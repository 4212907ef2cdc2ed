"""Importing this module registers everything (``custom_imports = dict(imports=['agvm.mm.registry'])``)."""
from . import register_all

register_all()
