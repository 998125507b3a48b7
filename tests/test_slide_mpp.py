"""Pixel-size parsers (pure) and the synthetic writer's variants."""

from __future__ import annotations

import pytest

from histolens.slide._mpp import (
    aperio_properties,
    mpp_from_aperio,
    mpp_from_ome,
    mpp_from_philips,
    mpp_from_resolution,
    mpp_from_ventana,
)

APERIO = (
    "Aperio Image Library v11.2.1\r\n46000x32914 (256x256) JPEG/RGB Q=30"
    "|AppMag = 20|MPP = 0.4990|Filename = CMU-1"
)


def test_aperio() -> None:
    assert aperio_properties(APERIO)["AppMag"] == "20"
    assert mpp_from_aperio(APERIO) == pytest.approx(0.499)
    assert mpp_from_aperio("Aperio Image Library|AppMag = 20") is None
    assert mpp_from_aperio("Aperio|MPP = n/a") is None


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ('PhysicalSizeX="0.227"', 0.227),  # default unit is micrometre
        ('PhysicalSizeX="0.25" PhysicalSizeXUnit="µm"', 0.25),
        ('PhysicalSizeX="250" PhysicalSizeXUnit="nm"', 0.25),
        ('PhysicalSizeX="0.00025" PhysicalSizeXUnit="mm"', 0.25),
        ('PhysicalSizeY="0.5"', 0.5),
        ("", None),
        ('PhysicalSizeX="0.25" PhysicalSizeXUnit="parsec"', None),
    ],
)
def test_ome(attrs: str, expected: float | None) -> None:
    xml = (
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0">'
        f'<Pixels ID="Pixels:0" SizeX="10" SizeY="10" {attrs}/></Image></OME>'
    )
    got = mpp_from_ome(xml)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_ome_not_xml() -> None:
    assert mpp_from_ome("not xml <") is None


@pytest.mark.parametrize(
    ("xres", "unit", "expected"),
    [
        ((40000, 1), 3, 0.25),  # 40,000 px/cm
        ((101600, 1), 2, 0.25),  # 101,600 px/inch
        ((72, 1), 2, None),  # the 72 dpi default is not a calibration
        ((40000, 1), 1, None),  # unit "none"
        (None, 3, None),
        ((1, 0), 3, None),
    ],
)
def test_resolution(xres, unit, expected) -> None:
    got = mpp_from_resolution(xres, unit)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_philips_and_ventana() -> None:
    philips = (
        '<DataObject><Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" '
        'PMSVR="IDoubleArray">&quot;0.000243902&quot; &quot;0.000243902&quot;'
        "</Attribute></DataObject>"
    )
    assert mpp_from_philips(philips) == pytest.approx(0.243902)
    assert mpp_from_philips("<DataObject/>") is None
    xmp = '<iScan Magnification="40" ScanRes="0.2325" />'
    assert mpp_from_ventana(xmp) == pytest.approx(0.2325)
    assert mpp_from_ventana("<iScan/>") is None
