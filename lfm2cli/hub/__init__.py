"""Where models come from: names and aliases (`names`), downloads from the Hugging Face hub (`download`, with
`progress` on stderr), the cache on disk (`local`) and the shapes of published models (`known`)."""
