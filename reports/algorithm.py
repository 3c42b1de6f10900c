"""Algorithm identification in its three DICOM spellings: attributes (SEG), TID 4019 content items and the
device observer (TID 1004) of SR documents."""

from __future__ import annotations

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    DeviceObserverIdentifyingAttributes,
    ObservationContext,
    ObserverContext,
)
from pydicom.sr.codedict import codes

from reports.coding import ALGORITHM_FAMILY_AI
from reports.inputs import AlgorithmInfo
from reports.uids import device_observer_uid

NODE_MANUFACTURER = "OmniCT node"


def algorithm_identification_sequence(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """Segment Algorithm Identification Sequence (0062,0007) content: Algorithm Family Code Sequence (0066,002F),
    Algorithm Name (0066,0036), Algorithm Version (0066,0031), Algorithm Source (0024,0202) and Algorithm
    Parameters (0066,0032)."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=algorithm.family or ALGORITHM_FAMILY_AI,
        version=algorithm.version,
        source=algorithm.source,
        parameters=dict(sorted(algorithm.parameters.items())) or None,
    )


def algorithm_identification_items(algorithm: AlgorithmInfo) -> AlgorithmIdentification:
    """TID 4019 content items: TEXT Algorithm Name (111001, DCM), TEXT Algorithm Version (111003, DCM), one TEXT
    Algorithm Parameters (111002, DCM) per "key=value", CODE Algorithm Family (111000, DCM) and TEXT Algorithm
    Manufacturer (122405, DCM)."""
    return AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=algorithm.parameter_strings() or None,
        family=algorithm.family or ALGORITHM_FAMILY_AI,
        manufacturer=NODE_MANUFACTURER,
    )


def device_observer_context(algorithm: AlgorithmInfo) -> ObserverContext:
    """TID 1002 Observer Type (121005, DCM) = Device, with TID 1004: Device Observer UID (121012), Name (121013),
    Manufacturer (121014) and Model Name (121015) = algorithm name and version."""
    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(NODE_MANUFACTURER, algorithm.name),
            name=algorithm.name,
            manufacturer_name=NODE_MANUFACTURER,
            model_name=f"{algorithm.name} {algorithm.version}",
        ),
    )


def observation_context(algorithm: AlgorithmInfo) -> ObservationContext:
    """TID 1001 observation context naming the algorithm as the (only) observer of an SR document."""
    return ObservationContext(observer_device_context=device_observer_context(algorithm))
