"""The node's results in the viewer radiologists open: OHIF 3, served locally against a real Orthanc."""
