"""The detector with text: the multimodal wrapper, the fusion, the text encoders and the measurements
of whether the text is used."""
