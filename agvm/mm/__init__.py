"""OpenMMLab (mmengine / mmdet / mmseg) integration of AGVM. Imports mmengine only when used."""
