"""The app's logic without the UI: the demo (recipes, names, rendering), the queue of merge runs, the
gallery and the tiny-model generator behind the offline demo. app.py wires it to Gradio; nothing in the
engine imports from here."""
