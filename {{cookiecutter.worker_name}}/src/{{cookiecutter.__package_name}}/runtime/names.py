"""This worker's identity, fixed when the project was generated. The only rendered chassis file."""

WORKER_NAME = "{{ cookiecutter.worker_name }}"
DESCRIPTION = {{ cookiecutter.description | tojson }}
SUBJECT_ROOT = "{{ cookiecutter.subject_root }}"
JOB_TYPE = "{{ cookiecutter.job_type }}"
STREAM_NAME = "{{ cookiecutter.__stream_name }}"
