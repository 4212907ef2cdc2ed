"""HTC-X detector parts (AGVM appendix A.5.2), registered with mmdet's MODELS registry.

Import-light: importing ``models.htc_x`` pulls in nothing heavy. Registration happens on importing
``models.htc_x.register`` (what the configs put in ``custom_imports``), which imports:

* ``rcnet``: RCNet neck (RevFP + CSN), registry name ``'RCNet'``;
* ``sepc``: SEPC neck (``'SEPC'``) and the combined HTC-X neck ``'RCNetSEPC'``;
* ``decoupled_head``: ``'DecoupledTransformerBBoxHead'``;
* ``htc_lite``: ``'HTCLiteRoIHead'`` and the detector ``'HTCX'``.
"""
