# OmniCT node image: the node (SCP, completeness, API) and the pipeline workers share it.
# CPU torch by default; GPU workers use the gpu target (CUDA torch from the PyTorch index at build time).
FROM python:3.11-slim-bookworm AS base
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk dicom3tools gcc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/omnict
COPY pyproject.toml constraints-cpu.txt README.md ./
COPY omnict_node omnict_node
COPY db db
COPY dicom_node dicom_node
COPY workers workers
COPY omnict_core omnict_core
COPY reports reports
COPY api api
COPY checkpoints checkpoints

FROM base AS cpu
RUN pip install --no-cache-dir -c constraints-cpu.txt torch --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -c constraints-cpu.txt .
ENTRYPOINT ["omnict-node"]

FROM base AS gpu
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir ".[totalseg,gpu]"
ENTRYPOINT ["omnict-node"]
