"""`memkd-ray serve`: the registry's best models behind one Ray Serve application.

    requests.py  routes, token, image bodies and answers (no Ray, no web framework)
    models.py    a checkpoint made ready to score: torch or ONNX Runtime (no Ray)
    app.py       the Ray Serve deployment: ModelServer (HTTP, multiplexed models, dynamic
                 batching, decisions, registry following)
    environment.py  Ray Serve's throughput settings for the Ray the service starts
"""
