"""OpenAI-shaped error responses: `{"error": {"message", "type", "param", "code"}}`.

Every failure the server reports goes through `APIError` so clients (the official `openai` SDK
included) see the status code and body they expect. A body that does not fit the schema (a
missing field, a wrong type, an unknown enum value) is 422; a well-formed field with an invalid
value (a range, a length, a cross-field rule) is 400.
"""

from http import HTTPStatus

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse


class APIError(Exception):
    """An error the client gets as JSON with `status_code`; never carries a traceback."""

    def __init__(self, message: str, *, status_code: int = HTTPStatus.BAD_REQUEST,
                 type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = int(status_code)
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status_code)


# pydantic error types that reject a value of the right type; every other type is a schema error.
_VALUE_ERROR_TYPES = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short",
                      "too_long", "value_error", "multiple_of", "finite_number"}


def validation_error(exc: ValidationError) -> APIError:
    """A pydantic validation failure: 422 for schema errors, 400 when only values are out of
    range; `param` is the first offending top-level field."""
    errors = exc.errors(include_url=False)
    schema_error = any(err["type"] not in _VALUE_ERROR_TYPES for err in errors)
    messages = []
    for err in errors:
        loc = ".".join(str(part) for part in err["loc"])
        message = f"{loc}: {err['msg']}" if loc else err["msg"]
        if message not in messages:
            messages.append(message)
    param = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
    status = HTTPStatus.UNPROCESSABLE_ENTITY if schema_error else HTTPStatus.BAD_REQUEST
    return APIError("Invalid request: " + "; ".join(messages), status_code=status, param=param)


def not_found_model(model: str, served_model_names: list[str]) -> APIError:
    names = ", ".join(f"`{name}`" for name in served_model_names)
    return APIError(f"The model `{model}` does not exist. This server serves {names}.",
                    status_code=HTTPStatus.NOT_FOUND, param="model", code="model_not_found")


async def http_exception_handler(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own 404/405 (unknown route, wrong method) in OpenAI's shape."""
    if exc.status_code == HTTPStatus.NOT_FOUND:
        message, code = f"Unknown request URL: {request.method} {request.url.path}.", "unknown_url"
    elif exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        message = f"Method {request.method} is not allowed for {request.url.path}."
        code = "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return APIError(message, status_code=exc.status_code, code=code).to_response()


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return exc.to_response()


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A fault inside the server or engine: a plain 500 (uvicorn logs the traceback)."""
    return APIError(f"Internal server error ({type(exc).__name__}); see the server log.",
                    status_code=HTTPStatus.INTERNAL_SERVER_ERROR,
                    type="internal_server_error").to_response()
