"""De-identification before training or serving: faces in images blurred or boxed out, personal information in
text replaced by typed placeholders, the speaker's voice in audio transformed (McAdams coefficient), and a
whole manifest de-identified into a new folder with a per-row report. What each protects against, and what it
does not: docs/privacy.md.

    from polysense.deid import anonymize_text, anonymize_image, anonymize_voice, anonymize_manifest
"""

from polysense.deid.anonymize import AnonymizeOptions, AnonymizeResult, anonymize_manifest
from polysense.deid.faces import Face, FaceDetector, FaceOptions
from polysense.deid.images import IMAGE_MODES, ImageOptions, ImageResult, anonymize_image
from polysense.deid.mcadams import VoiceOptions, anonymize_voice
from polysense.deid.text import KINDS, Finding, TextOptions, TextResult, anonymize_text, find_pii

__all__ = [
    "IMAGE_MODES",
    "KINDS",
    "AnonymizeOptions",
    "AnonymizeResult",
    "Face",
    "FaceDetector",
    "FaceOptions",
    "Finding",
    "ImageOptions",
    "ImageResult",
    "TextOptions",
    "TextResult",
    "VoiceOptions",
    "anonymize_image",
    "anonymize_manifest",
    "anonymize_text",
    "anonymize_voice",
    "find_pii",
]
