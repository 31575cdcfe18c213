"""The station catalogue (stations.json next to this file, or a file of the same format):
one reader, values checked, each station a `Station`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from host.errors import BadInput

CATALOGUE_PATH = Path(__file__).with_name("stations.json")


@dataclass(frozen=True)
class Station:
    name: str
    lat_deg: float
    lon_deg: float
    alt_m: float
    aperture_diameter_m: float
    elevation_mask_deg: float
    horizon: tuple  # ((azimuth_deg, elevation_deg), ...) sorted by azimuth; may be empty
    clear_night_fraction: float

    def mask_deg(self, azimuth_deg):
        """The elevation a pass must exceed at these azimuths: the mask, or the local
        horizon where it is higher (linear between points, wrapping round north)."""
        azimuth_deg = np.asarray(azimuth_deg, dtype=float)
        if not self.horizon:
            return np.full(azimuth_deg.shape, self.elevation_mask_deg)
        az = np.array([point[0] for point in self.horizon], dtype=float)
        el = np.array([point[1] for point in self.horizon], dtype=float)
        profile = np.interp(azimuth_deg % 360.0, az, el, period=360.0)
        return np.maximum(profile, self.elevation_mask_deg)


def _value(entry, origin: str):
    return entry["value"] if isinstance(entry, dict) and "value" in entry else entry


def load_catalogue(path: str | Path | None = None) -> dict[str, Station]:
    path = Path(path) if path is not None else CATALOGUE_PATH
    try:
        data = json.loads(path.read_text())
        entries = data["stations"]
    except OSError as error:
        raise BadInput(f"station catalogue {path}: {error.strerror}") from error
    except (ValueError, KeyError, TypeError) as error:
        raise BadInput(f"station catalogue {path}: not a catalogue ({error})") from error
    stations = {}
    for name, entry in entries.items():
        origin = f"station catalogue {path}: station {name}"
        try:
            horizon = tuple(
                (float(az), float(el)) for az, el in sorted(_value(entry["horizon"], origin))
            )
            station = Station(
                name=name,
                lat_deg=float(entry["lat_deg"]),
                lon_deg=float(entry["lon_deg"]),
                alt_m=float(entry["alt_m"]),
                aperture_diameter_m=float(_value(entry["aperture_diameter_m"], origin)),
                elevation_mask_deg=float(_value(entry["elevation_mask_deg"], origin)),
                horizon=horizon,
                clear_night_fraction=float(_value(entry["clear_night_fraction"], origin)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise BadInput(f"{origin}: missing or malformed field ({error})") from error
        if not -90 <= station.lat_deg <= 90 or not -180 <= station.lon_deg <= 360:
            raise BadInput(f"{origin}: latitude/longitude out of range")
        if not 0 <= station.elevation_mask_deg < 90:
            raise BadInput(f"{origin}: elevation_mask_deg must be in [0, 90)")
        if not 0 <= station.clear_night_fraction <= 1:
            raise BadInput(f"{origin}: clear_night_fraction must be in [0, 1]")
        if station.aperture_diameter_m <= 0:
            raise BadInput(f"{origin}: aperture_diameter_m must be positive")
        stations[name] = station
    return stations


def select_stations(names, catalogue: dict[str, Station]) -> list[Station]:
    """The named stations (a list, or a comma-separated string), unknown names refused."""
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in names if name not in catalogue]
    if unknown:
        raise BadInput(
            f"unknown station {', '.join(unknown)} (the catalogue has {', '.join(catalogue)})"
        )
    if not names:
        raise BadInput("no station given")
    return [catalogue[name] for name in names]
