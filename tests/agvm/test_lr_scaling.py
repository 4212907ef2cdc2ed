import math

import pytest

import agvm

# appendix A.5.1, Tables 1-3: (batch size, LR)
TABLE1_SGD = [(32, 0.04), (256, 0.226), (512, 0.32), (1024, 0.452)]
TABLE2_SGD_SEG = [(32, 0.01), (512, 0.113), (1024, 0.16), (2048, 0.226)]
TABLE3_ADAMW = [(32, 2e-4), (256, 9.8e-4), (512, 1.2e-3), (1024, 1.5e-3)]


def sig(x, digits):
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


@pytest.mark.parametrize("bs, lr", TABLE1_SGD)
def test_table1_sgd(bs, lr):
    assert agvm.sgd_lr(bs) == pytest.approx(lr, rel=2e-3)  # the table truncates 0.4525 to 0.452


@pytest.mark.parametrize("bs, lr", TABLE2_SGD_SEG)
def test_table2_sgd_segmentation(bs, lr):
    assert sig(agvm.sgd_lr(bs, task="segmentation"), 3) == pytest.approx(lr)


@pytest.mark.parametrize("bs, lr", TABLE3_ADAMW)
def test_table3_adamw(bs, lr):
    digits = len(str(lr).split("e")[0].replace(".", "").lstrip("0"))  # the table's significant digits
    assert sig(agvm.adamw_lr(bs), digits) == pytest.approx(lr)


def test_scaling_is_linear_below_the_knee_and_sqrt_above():
    assert agvm.sgd_lr(64) == pytest.approx(0.08)
    assert agvm.sgd_lr(128) == pytest.approx(0.16)
    assert agvm.sgd_lr(512) / agvm.sgd_lr(256) == pytest.approx(math.sqrt(2))
    assert agvm.adamw_lr(512) / agvm.adamw_lr(256) == pytest.approx(math.sqrt(1.5))
    assert agvm.sgd_lr(256, task="segmentation") == pytest.approx(0.08)  # knee at 256 for segmentation


def test_interval_rule_and_errors():
    assert [agvm.default_interval(b) for b in (32, 512, 1024, 10240)] == [10, 10, 5, 5]
    with pytest.raises(ValueError, match="positive"):
        agvm.sgd_lr(0)
    with pytest.raises(ValueError, match="task"):
        agvm.sgd_lr(32, task="panoptic")
