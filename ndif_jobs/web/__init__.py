"""Results in the browser: `ndif-jobs ui` (a local web app over the queue and the result store),
`ndif-jobs report` (one self-contained HTML file) and the notebook views of a result and a job.

`app.create_app(service)` builds the Starlette app; `pages` gathers what each page shows;
`queries` holds the aggregate reads; `security` the token, CSRF and host checks; `figures`
the figure cache; `report` and `notebook` render the same views outside the server.
"""
