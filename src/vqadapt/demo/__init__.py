"""``vqadapt demo``: a local web page that answers questions about an image and shows why.

- ``limits``: what the page accepts (file size, pixels, question length), checked first;
- ``core``: the logic, without Gradio: the answer, the top beams with their scores, the
  decoder's attention on the image patches, the preloaded examples;
- ``page``: the Gradio page on top of ``core`` (layout and wiring only), and serving it;
- ``browser``: drives the page in headless Chromium (the browser test, the README screenshot).
"""
