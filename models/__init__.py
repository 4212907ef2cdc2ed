"""Models of the AGVM reproduction (issue 5): UniNet (``models.uninet``, registered with timm on import),
its mmdet backbone (``models.mmdet_uninet``, imports mmdet) and the HTC-X parts.

Import-light on purpose: nothing here imports timm or mmdet. Import the submodule you need, e.g.
``import models.uninet`` (timm ``uninet_*`` models) or, in an mmdet config,
``custom_imports = dict(imports=['models.mmdet_uninet'])``.
"""
